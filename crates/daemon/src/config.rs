//! Daemon configuration: the TOML file, the embedded default, and validation into device
//! specs. Every error names the device and the field, and says what is allowed.
//!
//! ```toml
//! metrics = "127.0.0.1:9464" # optional: serve OpenMetrics at http://ADDR/metrics
//! seccomp = "trap"         # queue workers' seccomp filter: trap (default) | log | kill | off
//! user = "uvdpa:kvm"       # optional: drop to USER[:GROUP] after start-up (started as root)
//!
//! [[device]]
//! name = "blk0"            # 1..=32 of [A-Za-z0-9_.-], unique
//! mgmtdev = "blk"          # device type: "blk" or "net"
//! backend = "ram"          # ram | file | null | nbd | rbd
//! size = "256M"            # bytes, or with K/M/G/T (binary) suffix; ram and null
//! path = "/var/lib/disk.img"  # file backend
//! direct = false           # file backend: O_DIRECT
//! aio = "io_uring"         # file backend: io_uring (default; sync where unavailable) | sync
//! uri = "nbd://host:10809/export"  # nbd backend (or nbd+unix:///export?socket=PATH)
//! connections = 1          # nbd: 1..=queues (more only with NBD_FLAG_CAN_MULTI_CONN)
//! reconnect_delay = 0      # nbd: seconds requests wait for a lost server, 0..=3600
//! timeout = 30             # nbd, rbd: seconds a request may take, 1..=3600
//! pool = "rbd"             # rbd backend: the pool, the image in it, the cluster's conf,
//! image = "disk0"          #   the cephx user (default admin) and optionally its keyring
//! conf = "/etc/ceph/ceph.conf"
//! id = "admin"
//! keyring = "/etc/ceph/ceph.client.admin.keyring"
//! queues = 1               # 1..=64
//! queue_size = 128         # power of two, 1..=32768: seg_max is min(queue_size, 1024) - 2
//! read_only = false
//! serial = "uvdpa-blk0"    # at most 20 bytes
//! logical_block_size = 512 # 512, 1024, 2048 or 4096
//! poll_us = 32             # busy-poll window after the ring empties, µs (0 = off; net, rbd: 0)
//! mandate = ["VIRTIO_BLK_F_FLUSH"]  # features the driver must accept (FEATURES_OK)
//! coalesce_usecs = 0       # interrupt coalescing per queue vector (0 = off)
//! coalesce_frames = 0
//! unoffer = ["VIRTIO_F_RING_PACKED"]  # features the device must not offer
//! transport = "vhost-user" # vhost-user (a socket) | vduse (a kernel vDPA device)
//! bind = "vduse"           # vduse: add it to the vDPA bus (vdpa mgmtdev vduse) | "none"
//! bounce_size = "64M"      # vduse: the kernel's bounce buffer, > the largest request
//! max_memory = "4T"       # vhost-user: most address space the memory table may map
//!
//! [[device]]
//! name = "net0"
//! mgmtdev = "net"
//! backend = "loopback"     # loopback | tap | switch | sink | source
//! mac = "02:00:00:00:00:01"  # unicast; default: generated from the name (locally administered)
//! mtu = 1500               # 68..=65535 bytes
//! queue_pairs = 1          # 1..=16 (rx/tx pairs; `max_vqp` on the command line)
//! queue_size = 256         # 1..=32768
//! tap = "uvdpa-net0"       # tap backend: interface name, at most 15 bytes
//! switch = "sw0"           # switch backend (required there): in-daemon L2 switch name
//! frame_len = 64           # source backend: 60..=mtu+14 bytes
//! poll_us = 0              # as for blk, like mandate and coalesce_*
//! mandate = ["VIRTIO_NET_F_MRG_RXBUF"]
//! ```
//!
//! A field of the other device type (`size` on a net device, `mac` on a blk device) is an
//! error naming it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uvdpa_devices::blk::nbd::{NbdSpec, NbdUri, DEFAULT_TIMEOUT as NBD_DEFAULT_TIMEOUT};
use uvdpa_devices::blk::rbd::{RbdSpec, DEFAULT_ID as RBD_DEFAULT_ID};
use uvdpa_devices::blk::{
    Aio, BackendSpec, BlkConfig, DEFAULT_QUEUE_SIZE as DEFAULT_BLK_QUEUE_SIZE,
};
use uvdpa_devices::net::config::{
    generate_mac, parse_mac, NetConfig, NetConfigError, DEFAULT_MTU, MAX_MTU, MIN_MTU,
};
use uvdpa_devices::net::device::{NetBackendSpec, MAX_NET_QUEUE_SIZE};
use uvdpa_vhost_user::SocketAccess;

/// Configuration errors.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown fields included).
    #[error("Invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the field and line).
        message: String,
    },
    /// A field has a value outside its range.
    #[error("device {device}: field `{field}`: {reason}")]
    Field {
        /// Device name (or its index when the name itself is wrong).
        device: String,
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
}

/// A size given as a number of bytes or a string with a binary suffix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// "256M", "1G", "4096".
    Text(String),
}

/// One `[[device]]` table as written, or the attributes of `uvdpa dev add` (the CLI builds
/// one and sends it to the daemon, which validates it with the same code as the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Device name.
    pub name: Option<String>,
    /// Device type.
    pub mgmtdev: Option<String>,
    /// Backend kind.
    pub backend: Option<String>,
    /// Capacity (blk: ram, null).
    pub size: Option<SizeValue>,
    /// Backing file (blk: file).
    pub path: Option<PathBuf>,
    /// O_DIRECT (blk: file).
    pub direct: Option<bool>,
    /// How the file is read and written: `io_uring` or `sync` (blk: file).
    pub aio: Option<String>,
    /// The NBD server and export, `nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH` (blk: nbd).
    pub uri: Option<String>,
    /// NBD connections, 1..=queues (blk: nbd).
    pub connections: Option<u16>,
    /// Seconds requests wait for a lost NBD server to come back (blk: nbd).
    pub reconnect_delay: Option<u32>,
    /// Seconds an NBD request or RBD operation may take before it fails (blk: nbd, rbd).
    pub timeout: Option<u32>,
    /// Ceph pool of the image (blk: rbd).
    pub pool: Option<String>,
    /// RBD image name (blk: rbd).
    pub image: Option<String>,
    /// The ceph.conf of the cluster (blk: rbd).
    pub conf: Option<PathBuf>,
    /// The cephx user, without `client.` (blk: rbd; default admin).
    pub id: Option<String>,
    /// The cephx keyring (blk: rbd; default: the conf's).
    pub keyring: Option<PathBuf>,
    /// Number of virtqueues (blk).
    pub queues: Option<u16>,
    /// Queue size.
    pub queue_size: Option<u16>,
    /// Read-only (blk).
    pub read_only: Option<bool>,
    /// Serial (blk: GET_ID).
    pub serial: Option<String>,
    /// Logical block size in bytes (blk).
    pub logical_block_size: Option<u32>,
    /// MAC address, `aa:bb:cc:dd:ee:ff` (net).
    pub mac: Option<String>,
    /// MTU in bytes (net).
    pub mtu: Option<u32>,
    /// Receive/transmit queue pairs (net; `max_vqp` on the command line).
    pub queue_pairs: Option<u16>,
    /// TAP interface name (net: tap).
    pub tap: Option<String>,
    /// In-daemon switch name (net: switch).
    pub switch: Option<String>,
    /// Length of the generated frames (net: source).
    pub frame_len: Option<u16>,
    /// Busy-poll window of each queue worker after its ring runs empty, in µs (0 = off).
    pub poll_us: Option<u32>,
    /// Features the driver must accept, by spec name (seed 004: mandated at creation).
    pub mandate: Option<Vec<String>>,
    /// Interrupt coalescing of every queue vector: at most one signal per this many µs.
    pub coalesce_usecs: Option<u32>,
    /// Interrupt coalescing of every queue vector: at most one signal per this many batches.
    pub coalesce_frames: Option<u32>,
    /// Features the device must not offer, by spec name (e.g. VIRTIO_F_RING_PACKED).
    pub unoffer: Option<Vec<String>>,
    /// How drivers reach the device: `vhost-user` (default) or `vduse`.
    pub transport: Option<String>,
    /// VDUSE: `vduse` (add the device to the vDPA bus through vdpa netlink, the default)
    /// or `none` (left for `vdpa dev add` by hand).
    pub bind: Option<String>,
    /// VDUSE: size of the kernel's bounce buffer (bytes, or with K/M/G suffix).
    pub bounce_size: Option<SizeValue>,
    /// vhost-user: permission bits of the socket file, octal (`"0660"`).
    pub socket_mode: Option<String>,
    /// vhost-user: owner of the socket file, a user name or uid, also accepted as a peer.
    pub socket_user: Option<String>,
    /// vhost-user: group of the socket file, a group name or gid; processes whose primary
    /// group it is are accepted as peers.
    pub socket_group: Option<String>,
    /// vhost-user: most bytes of address space a frontend's memory table may map (bytes,
    /// or with K/M/G/T suffix).
    pub max_memory: Option<SizeValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// `ADDR:PORT` of the metrics endpoint (off when absent).
    #[serde(default)]
    metrics: Option<String>,
    /// The queue workers' seccomp mode (`trap` when absent).
    #[serde(default)]
    seccomp: Option<String>,
    /// `USER[:GROUP]` to run as after start-up.
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

/// A validated config file.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The devices, in file order, each with the table it was validated from (a reload
    /// compares tables to tell a changed device from an unchanged one).
    pub devices: Vec<(DeviceEntry, DeviceSpec)>,
    /// Where to serve metrics (`metrics = "127.0.0.1:9464"`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// The queue workers' seccomp mode (`seccomp = "kill"`), if set.
    pub seccomp: Option<uvdpa_virtio::sandbox::Mode>,
    /// Who to run as after start-up (`user = "nobody"`), if set; resolved at start-up.
    pub user: Option<String>,
}

/// Default length of the frames of a `source` net backend.
pub const NET_DEFAULT_FRAME_LEN: u16 = 64;
/// A blk device's default busy-poll window after its ring empties, µs: the window
/// qemu-storage-daemon's adaptive polling uses (poll-max-ns 32768). `poll_us = 0` turns it
/// off (the worker then sleeps in epoll after every batch).
pub const BLK_DEFAULT_POLL_US: u32 = 32;
pub use uvdpa_vhost_user::session::DEFAULT_MAX_MEMORY;
/// Smallest `max_memory`: 1 MiB.
pub const MIN_MAX_MEMORY: u64 = 1 << 20;
/// Largest `max_memory`: 128 TiB, the user address space of x86-64 with 4-level paging.
pub const MAX_MAX_MEMORY: u64 = 128 << 40;
/// Largest `reconnect_delay` and `timeout` of an `nbd` backend, seconds.
pub const NBD_MAX_SECONDS: u32 = 3600;
/// Shortest frame of a `source` net backend (an Ethernet minimum frame without its FCS).
pub const NET_MIN_FRAME_LEN: u16 = 60;

/// A validated virtio-net device.
#[derive(Debug, Clone)]
pub struct NetSpec {
    /// MAC, MTU, queue pairs, link.
    pub config: NetConfig,
    /// Largest queue size, 1..=32768.
    pub queue_size: u16,
    /// Where the frames go.
    pub backend: NetBackendSpec,
}

/// The device type of a [`DeviceSpec`] and its type-specific configuration.
#[derive(Debug, Clone)]
pub enum DeviceKind {
    /// virtio-blk (mgmtdev `blk`).
    Blk(BlkConfig),
    /// virtio-net (mgmtdev `net`).
    Net(NetSpec),
}

/// How drivers reach a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A vhost-user socket `<run-dir>/<name>.sock` (QEMU, DPDK, libblkio).
    VhostUser,
    /// A VDUSE device `/dev/vduse/<name>` in the kernel's vDPA framework.
    Vduse {
        /// Add it to the vDPA bus (vdpa netlink `VDPA_CMD_DEV_NEW`, mgmtdev `vduse`).
        bind: bool,
        /// The kernel's bounce buffer for it, bytes (sysfs `bounce_size`).
        bounce_size: u64,
    },
}

impl Transport {
    /// `vhost-user` or `vduse`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::VhostUser => "vhost-user",
            Transport::Vduse { .. } => "vduse",
        }
    }
}

/// Smallest default VDUSE bounce buffer: the kernel's own default (64 MiB). A blk device
/// gets the power of two above its largest request (`seg_max` × `size_max`) if that is more.
pub const VDUSE_DEFAULT_BOUNCE: u64 = 64 << 20;
/// What a VDUSE device withholds unless `unoffer` is given: VIRTIO_F_RING_PACKED (bit 34).
pub const VDUSE_DEFAULT_UNOFFER: u64 = 1 << 34;
/// Largest VDUSE bounce buffer the kernel accepts (1 GiB, `VDUSE_MAX_BOUNCE_SIZE`).
pub const VDUSE_MAX_BOUNCE: u64 = 1 << 30;
/// Smallest: the kernel's `VDUSE_MIN_BOUNCE_SIZE` (1 MiB).
pub const VDUSE_MIN_BOUNCE: u64 = 1 << 20;

/// A validated device to create.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device name; its socket is `<run-dir>/<name>.sock`.
    pub name: String,
    /// Device type and its configuration.
    pub kind: DeviceKind,
    /// Busy-poll window per queue worker, in µs (0 = off).
    pub poll_us: u32,
    /// Mandated feature bits (beyond VIRTIO_F_VERSION_1).
    pub mandate: u64,
    /// Initial coalescing of every queue vector: (µs, batches); (0, 0) = off.
    pub coalesce: (u32, u32),
    /// Feature bits the device does not offer (the `unoffer` attribute).
    pub unoffer: u64,
    /// How drivers reach it.
    pub transport: Transport,
    /// Who may connect to the vhost-user socket.
    pub access: SocketAccess,
    /// vhost-user: most bytes of address space a frontend's memory table may map.
    pub max_memory: u64,
    /// The table it was validated from (a live upgrade hands it to the new daemon).
    pub entry: DeviceEntry,
}

impl DeviceSpec {
    /// The mgmtdev name: `blk` or `net`.
    pub fn mgmtdev(&self) -> &'static str {
        match self.kind {
            DeviceKind::Blk(_) => "blk",
            DeviceKind::Net(_) => "net",
        }
    }

    /// Number of virtqueues (net: a receive and a transmit queue per pair, and the
    /// control queue).
    pub fn num_queues(&self) -> u16 {
        match &self.kind {
            DeviceKind::Blk(b) => b.num_queues,
            DeviceKind::Net(n) => n.config.num_queues(),
        }
    }

    /// Largest queue size.
    pub fn queue_size(&self) -> u16 {
        match &self.kind {
            DeviceKind::Blk(b) => b.queue_size,
            DeviceKind::Net(n) => n.queue_size,
        }
    }
}

#[cfg(test)]
impl DeviceSpec {
    /// The virtio-blk configuration, for a blk device.
    pub fn blk(&self) -> Option<&BlkConfig> {
        match &self.kind {
            DeviceKind::Blk(b) => Some(b),
            DeviceKind::Net(_) => None,
        }
    }

    /// The virtio-net configuration, for a net device.
    pub fn net(&self) -> Option<&NetSpec> {
        match &self.kind {
            DeviceKind::Net(n) => Some(n),
            DeviceKind::Blk(_) => None,
        }
    }
}

/// The bit of a feature of a `mgmtdev` device given by its spec name: device-independent
/// names (`VIRTIO_F_VERSION_1`) for every type, and the type's own (`VIRTIO_BLK_F_FLUSH`,
/// `VIRTIO_NET_F_MRG_RXBUF`). Device-specific bits overlap (bit 13 is both
/// VIRTIO_BLK_F_DISCARD and VIRTIO_NET_F_HOST_ECN), so a name of another type is `None`.
pub fn feature_bit(mgmtdev: &str, name: &str) -> Option<u64> {
    use uvdpa_virtio::VirtioFeatures;
    VirtioFeatures::from_name(name)
        .map(|f| f.bits())
        .or_else(|| match mgmtdev {
            "blk" => uvdpa_devices::blk::BlkFeatures::from_name(name).map(|f| f.bits()),
            "net" => VirtioFeatures::from_net_name(name).map(|f| f.bits()),
            _ => None,
        })
}

/// Parses "256M"-style sizes: digits with an optional K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// Whether `s` is a valid Linux interface name (`dev_valid_name`): 1..=15 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Whether `s` is a valid device (or switch) name: 1..=32 of [A-Za-z0-9_.-], not starting
/// with `.`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !s.starts_with('.')
}

/// Fields only a blk device has.
const BLK_FIELDS: [&str; 17] = [
    "size",
    "path",
    "direct",
    "aio",
    "uri",
    "connections",
    "reconnect_delay",
    "timeout",
    "pool",
    "image",
    "conf",
    "id",
    "keyring",
    "queues",
    "read_only",
    "serial",
    "logical_block_size",
];
/// Fields only a net device has.
const NET_FIELDS: [&str; 6] = ["mac", "mtu", "queue_pairs", "tap", "switch", "frame_len"];

type FieldErr<'a> = &'a dyn Fn(&'static str, String) -> ConfigError;

impl DeviceEntry {
    /// The type-specific fields that are set, by name.
    fn present(&self) -> Vec<&'static str> {
        [
            ("size", self.size.is_some()),
            ("path", self.path.is_some()),
            ("direct", self.direct.is_some()),
            ("aio", self.aio.is_some()),
            ("uri", self.uri.is_some()),
            ("connections", self.connections.is_some()),
            ("reconnect_delay", self.reconnect_delay.is_some()),
            ("timeout", self.timeout.is_some()),
            ("pool", self.pool.is_some()),
            ("image", self.image.is_some()),
            ("conf", self.conf.is_some()),
            ("id", self.id.is_some()),
            ("keyring", self.keyring.is_some()),
            ("queues", self.queues.is_some()),
            ("read_only", self.read_only.is_some()),
            ("serial", self.serial.is_some()),
            ("logical_block_size", self.logical_block_size.is_some()),
            ("mac", self.mac.is_some()),
            ("mtu", self.mtu.is_some()),
            ("queue_pairs", self.queue_pairs.is_some()),
            ("tap", self.tap.is_some()),
            ("switch", self.switch.is_some()),
            ("frame_len", self.frame_len.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, set)| set.then_some(n))
        .collect()
    }

    /// Validates one entry (index `i` in the file) into a [`DeviceSpec`].
    ///
    /// # Errors
    /// [`ConfigError::Field`] naming the first invalid field.
    pub fn validate(&self, i: usize) -> Result<DeviceSpec, ConfigError> {
        let name = self.name.clone().unwrap_or_default();
        let label = if name.is_empty() {
            format!("#{i}")
        } else {
            name.clone()
        };
        let err = |field: &'static str, reason: String| ConfigError::Field {
            device: label.clone(),
            field,
            reason,
        };
        if !valid_name(&name) {
            return Err(err(
                "name",
                format!("{name:?}: 1 to 32 characters of A-Z a-z 0-9 _ - . (not starting with .)"),
            ));
        }
        let mgmtdev = match self.mgmtdev.as_deref() {
            Some(m @ ("blk" | "net")) => m,
            other => {
                return Err(err(
                    "mgmtdev",
                    format!("{other:?}: one of \"blk\", \"net\""),
                ))
            }
        };
        let (foreign, owner) = if mgmtdev == "blk" {
            (&NET_FIELDS[..], "net")
        } else {
            (&BLK_FIELDS[..], "blk")
        };
        if let Some(f) = self.present().into_iter().find(|f| foreign.contains(f)) {
            let hint = match f {
                "queues" => " (a net device has `queue_pairs`)",
                "queue_pairs" => " (a blk device has `queues`)",
                _ => "",
            };
            return Err(err(f, format!("only valid with mgmtdev {owner}{hint}")));
        }
        let kind = if mgmtdev == "blk" {
            DeviceKind::Blk(self.validate_blk(&name, &err)?)
        } else {
            DeviceKind::Net(self.validate_net(&name, &err)?)
        };
        let transport = self.validate_transport(&kind, &err)?;
        let access = self.validate_access(&transport, &err)?;
        let max_memory = self.validate_max_memory(&transport, &err)?;
        // blk over vhost-user polls by default, as qemu-storage-daemon does (adaptive,
        // 32 µs); net does not (its users pick busy-polling or none, as with DPDK). Over
        // VDUSE the driver runs on the daemon's own CPUs, and a polling worker takes them
        // from the threads that submit the I/O: measured in the 6.12 guest, polling cut
        // uvdpa's IOPS to 0.13-0.42x qsd's, without it 0.9-1.3x (README, VDUSE benchmark).
        // An `rbd` disk does not poll either: librbd completes in 150 µs or more, so a 32 µs
        // window seldom finds work, and it took twice the worker's CPU per request (QD32
        // reads, measured) from the OSD sharing the CPUs (README, RBD benchmark).
        let rbd = matches!(&kind, DeviceKind::Blk(b) if matches!(b.backend, BackendSpec::Rbd(_)));
        let default_poll = match (&transport, mgmtdev) {
            (Transport::VhostUser, "blk") if !rbd => BLK_DEFAULT_POLL_US,
            _ => 0,
        };
        let poll_us = self.poll_us.unwrap_or(default_poll);
        if poll_us > 1_000_000 {
            return Err(err(
                "poll_us",
                format!("{poll_us}: 0..=1000000 microseconds"),
            ));
        }
        let mut mandate = 0u64;
        let example = if mgmtdev == "blk" {
            "VIRTIO_BLK_F_FLUSH"
        } else {
            "VIRTIO_NET_F_MRG_RXBUF"
        };
        for f in self.mandate.iter().flatten() {
            let bit = feature_bit(mgmtdev, f).ok_or_else(|| {
                err(
                    "mandate",
                    format!("{f:?}: not a feature name (e.g. {example})"),
                )
            })?;
            mandate |= bit;
        }
        let mut unoffer = 0u64;
        // `unoffer none` on the command line (`unoffer = []` in the file): withhold nothing.
        for f in self
            .unoffer
            .iter()
            .flatten()
            .filter(|f| f.as_str() != "none")
        {
            let bit = feature_bit(mgmtdev, f).ok_or_else(|| {
                err(
                    "unoffer",
                    format!("{f:?}: not a feature name (e.g. VIRTIO_F_RING_PACKED)"),
                )
            })?;
            // VERSION_1 is what every transport here speaks (virtio 1.x only).
            if bit == 1 << 32 || mandate & bit != 0 {
                return Err(err(
                    "unoffer",
                    format!("{f}: mandated (VIRTIO_F_VERSION_1 always is)"),
                ));
            }
            unoffer |= bit;
        }
        if self.unoffer.is_none() && matches!(transport, Transport::Vduse { .. }) {
            // A daemon restart under a packed ring with many requests in flight hung in CI
            // (resubmission from the packed region); split rings recover (resubmitted=5
            // seen). `unoffer = []` offers packed rings without that guarantee.
            unoffer |= VDUSE_DEFAULT_UNOFFER;
        }
        let coalesce = (
            self.coalesce_usecs.unwrap_or(0),
            self.coalesce_frames.unwrap_or(0),
        );
        if coalesce.0 > 1_000_000 {
            return Err(err(
                "coalesce_usecs",
                format!("{}: 0..=1000000 microseconds", coalesce.0),
            ));
        }
        Ok(DeviceSpec {
            entry: self.clone(),
            coalesce,
            mandate,
            unoffer,
            poll_us,
            name,
            kind,
            transport,
            access,
            max_memory,
        })
    }

    /// `max_memory` (vhost-user only): 1 MiB..=128 TiB, default [`DEFAULT_MAX_MEMORY`].
    fn validate_max_memory(
        &self,
        transport: &Transport,
        err: FieldErr<'_>,
    ) -> Result<u64, ConfigError> {
        let Some(v) = &self.max_memory else {
            return Ok(DEFAULT_MAX_MEMORY);
        };
        if *transport != Transport::VhostUser {
            return Err(err(
                "max_memory",
                "only valid with transport vhost-user (VDUSE memory is the kernel's IOTLB)".into(),
            ));
        }
        let bytes = match v {
            SizeValue::Bytes(b) => Some(*b),
            SizeValue::Text(t) => parse_size(t),
        };
        bytes
            .filter(|b| (MIN_MAX_MEMORY..=MAX_MAX_MEMORY).contains(b))
            .ok_or_else(|| {
                err(
                    "max_memory",
                    format!("{v:?}: bytes or K/M/G/T, 1M..=128T (default 4T)"),
                )
            })
    }

    /// `socket_mode`, `socket_user`, `socket_group` (vhost-user only); names are looked
    /// up in the system's user and group databases.
    fn validate_access(
        &self,
        transport: &Transport,
        err: FieldErr<'_>,
    ) -> Result<SocketAccess, ConfigError> {
        let fields = [
            ("socket_mode", self.socket_mode.is_some()),
            ("socket_user", self.socket_user.is_some()),
            ("socket_group", self.socket_group.is_some()),
        ];
        if *transport != Transport::VhostUser {
            if let Some((f, _)) = fields.iter().find(|(_, set)| *set) {
                return Err(err(f, "only valid with transport vhost-user".into()));
            }
        }
        let mut access = SocketAccess::default();
        if let Some(m) = &self.socket_mode {
            access.mode = u32::from_str_radix(m, 8)
                .ok()
                .filter(|&v| v <= 0o777 && !m.is_empty() && m.len() <= 4)
                .ok_or_else(|| err("socket_mode", format!("{m:?}: octal 0000..=0777")))?;
        }
        if let Some(u) = &self.socket_user {
            access.user = Some(match u.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => uzers::get_user_by_name(u)
                    .map(|x| x.uid())
                    .ok_or_else(|| err("socket_user", format!("{u:?}: no such user")))?,
            });
        }
        if let Some(g) = &self.socket_group {
            access.group = Some(match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => uzers::get_group_by_name(g)
                    .map(|x| x.gid())
                    .ok_or_else(|| err("socket_group", format!("{g:?}: no such group")))?,
            });
        }
        Ok(access)
    }

    fn validate_transport(
        &self,
        kind: &DeviceKind,
        err: FieldErr<'_>,
    ) -> Result<Transport, ConfigError> {
        match self.transport.as_deref().unwrap_or("vhost-user") {
            "vhost-user" => {
                for (f, set) in [
                    ("bind", self.bind.is_some()),
                    ("bounce_size", self.bounce_size.is_some()),
                ] {
                    if set {
                        return Err(err(f, "only valid with transport vduse".into()));
                    }
                }
                Ok(Transport::VhostUser)
            }
            "vduse" => {
                let bind = match self.bind.as_deref().unwrap_or("vduse") {
                    "vduse" => true,
                    "none" => false,
                    other => return Err(err("bind", format!("{other:?}: vduse | none"))),
                };
                // The kernel bounces every request through this buffer: a request larger
                // than it never completes (the driver waits in D state), so the default
                // holds the largest request and a smaller one is refused.
                let largest = match kind {
                    DeviceKind::Blk(b) => {
                        u64::from(uvdpa_devices::blk::seg_max(b.queue_size))
                            * u64::from(uvdpa_devices::blk::SIZE_MAX)
                    }
                    DeviceKind::Net(n) => u64::from(n.config.mtu) + 14 + 12,
                };
                let bounce_size = match &self.bounce_size {
                    None => (largest + 1)
                        .next_power_of_two()
                        .clamp(VDUSE_DEFAULT_BOUNCE, VDUSE_MAX_BOUNCE),
                    Some(SizeValue::Bytes(b)) => *b,
                    Some(SizeValue::Text(t)) => parse_size(t).ok_or_else(|| {
                        err(
                            "bounce_size",
                            format!("{t:?}: a byte count with optional K/M/G suffix"),
                        )
                    })?,
                };
                if !(VDUSE_MIN_BOUNCE..=VDUSE_MAX_BOUNCE).contains(&bounce_size)
                    || bounce_size <= largest
                {
                    return Err(err(
                        "bounce_size",
                        format!(
                            "{bounce_size}: {VDUSE_MIN_BOUNCE}..={VDUSE_MAX_BOUNCE} bytes and more than the largest request ({largest} bytes)"
                        ),
                    ));
                }
                Ok(Transport::Vduse { bind, bounce_size })
            }
            other => Err(err("transport", format!("{other:?}: vhost-user | vduse"))),
        }
    }

    fn validate_blk(&self, name: &str, err: FieldErr<'_>) -> Result<BlkConfig, ConfigError> {
        let size = match &self.size {
            None => None,
            Some(SizeValue::Bytes(b)) => Some(*b),
            Some(SizeValue::Text(t)) => Some(parse_size(t).ok_or_else(|| {
                err(
                    "size",
                    format!("{t:?}: a byte count with optional K/M/G/T suffix"),
                )
            })?),
        };
        let need_size =
            |kind: &str| size.ok_or_else(|| err("size", format!("required for backend {kind}")));
        let backend = match self.backend.as_deref().unwrap_or("ram") {
            "ram" => BackendSpec::Ram {
                size: need_size("ram")?,
            },
            "null" => BackendSpec::Null {
                size: need_size("null")?,
            },
            "file" => BackendSpec::File {
                path: self
                    .path
                    .clone()
                    .ok_or_else(|| err("path", "required for backend file".into()))?,
                direct: self.direct.unwrap_or(false),
                aio: match self.aio.as_deref() {
                    None => Aio::default(),
                    Some(a) => a.parse().map_err(|reason| err("aio", reason))?,
                },
            },
            "nbd" => BackendSpec::Nbd(self.validate_nbd(err)?),
            "rbd" => BackendSpec::Rbd(self.validate_rbd(err)?),
            other => {
                return Err(err(
                    "backend",
                    format!("{other:?}: one of ram, file, null, nbd, rbd"),
                ))
            }
        };
        let is_file = matches!(backend, BackendSpec::File { .. });
        let is_nbd = matches!(backend, BackendSpec::Nbd(_));
        let is_rbd = matches!(backend, BackendSpec::Rbd(_));
        for (field, set, ok, owner) in [
            ("path", self.path.is_some(), is_file, "file"),
            ("aio", self.aio.is_some(), is_file, "file"),
            // Ignored by ram and null (as before), refused with nbd and rbd.
            ("direct", self.direct.is_some(), !is_nbd && !is_rbd, "file"),
            ("size", size.is_some(), !is_nbd && !is_rbd, "ram, null"),
            ("pool", self.pool.is_some(), is_rbd, "rbd"),
            ("image", self.image.is_some(), is_rbd, "rbd"),
            ("conf", self.conf.is_some(), is_rbd, "rbd"),
            ("id", self.id.is_some(), is_rbd, "rbd"),
            ("keyring", self.keyring.is_some(), is_rbd, "rbd"),
            ("uri", self.uri.is_some(), is_nbd, "nbd"),
            ("connections", self.connections.is_some(), is_nbd, "nbd"),
            (
                "reconnect_delay",
                self.reconnect_delay.is_some(),
                is_nbd,
                "nbd",
            ),
            (
                "timeout",
                self.timeout.is_some(),
                is_nbd || is_rbd,
                "nbd, rbd",
            ),
        ] {
            if set && !ok {
                return Err(err(field, format!("only valid with backend {owner}")));
            }
        }
        if let Some(s) = size {
            if s == 0 || s % 512 != 0 {
                return Err(err(
                    "size",
                    format!("{s}: a positive multiple of 512 bytes"),
                ));
            }
        }
        let queues = self.queues.unwrap_or(1);
        if !(1..=64).contains(&queues) {
            return Err(err("queues", format!("{queues}: 1..=64")));
        }
        let queue_size = self.queue_size.unwrap_or(DEFAULT_BLK_QUEUE_SIZE);
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(err(
                "queue_size",
                format!("{queue_size}: a power of two, 1..=32768"),
            ));
        }
        let lbs = self.logical_block_size.unwrap_or(512);
        if !matches!(lbs, 512 | 1024 | 2048 | 4096) {
            return Err(err(
                "logical_block_size",
                format!("{lbs}: 512, 1024, 2048 or 4096"),
            ));
        }
        let serial = self
            .serial
            .clone()
            .unwrap_or_else(|| format!("uvdpa-{name}"));
        if serial.len() > 20 {
            return Err(err("serial", format!("{serial:?}: at most 20 bytes")));
        }
        Ok(BlkConfig {
            backend,
            read_only: self.read_only.unwrap_or(false),
            num_queues: queues,
            queue_size,
            serial,
            logical_block_size: lbs,
        })
    }

    /// The attributes of an `nbd` backend.
    fn validate_nbd(&self, err: FieldErr<'_>) -> Result<NbdSpec, ConfigError> {
        let text = self
            .uri
            .as_deref()
            .ok_or_else(|| err("uri", "required for backend nbd (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)".into()))?;
        let uri: NbdUri = text.parse().map_err(|reason| err("uri", reason))?;
        let queues = self.queues.unwrap_or(1);
        let connections = self.connections.unwrap_or(1);
        if connections == 0 || connections > queues.max(1) {
            return Err(err(
                "connections",
                format!(
                    "{connections}: 1..=queues ({queues}): each connection is served by one queue worker"
                ),
            ));
        }
        let reconnect_delay = self.reconnect_delay.unwrap_or(0);
        if reconnect_delay > NBD_MAX_SECONDS {
            return Err(err(
                "reconnect_delay",
                format!("{reconnect_delay}: 0..={NBD_MAX_SECONDS} seconds"),
            ));
        }
        let timeout = self.timeout.unwrap_or(NBD_DEFAULT_TIMEOUT.as_secs() as u32);
        if !(1..=NBD_MAX_SECONDS).contains(&timeout) {
            return Err(err(
                "timeout",
                format!("{timeout}: 1..={NBD_MAX_SECONDS} seconds"),
            ));
        }
        Ok(NbdSpec {
            uri,
            connections,
            reconnect_delay: std::time::Duration::from_secs(u64::from(reconnect_delay)),
            timeout: std::time::Duration::from_secs(u64::from(timeout)),
        })
    }

    /// The attributes of an `rbd` backend.
    fn validate_rbd(&self, err: FieldErr<'_>) -> Result<RbdSpec, ConfigError> {
        // Ceph names: no NUL (C strings), no `/` in pool or image (`POOL/IMAGE` syntax),
        // nothing empty.
        let name = |field: &'static str, v: Option<&str>| -> Result<String, ConfigError> {
            let v = v.ok_or_else(|| err(field, "required for backend rbd".into()))?;
            if v.is_empty() || v.len() > 255 || v.contains(['\0', '/', '@']) {
                return Err(err(
                    field,
                    format!("{v:?}: 1..=255 bytes without '/', '@' or NUL"),
                ));
            }
            Ok(v.to_string())
        };
        let pool = name("pool", self.pool.as_deref())?;
        let image = name("image", self.image.as_deref())?;
        let conf = self
            .conf
            .clone()
            .ok_or_else(|| err("conf", "required for backend rbd (a ceph.conf path)".into()))?;
        let id = self.id.clone().unwrap_or_else(|| RBD_DEFAULT_ID.into());
        if id.is_empty() || id.len() > 255 || id.contains(['\0', '.', ' ']) {
            return Err(err(
                "id",
                format!("{id:?}: a cephx user without `client.`, 1..=255 bytes"),
            ));
        }
        for (field, p) in [("conf", Some(&conf)), ("keyring", self.keyring.as_ref())] {
            if p.is_some_and(|p| p.as_os_str().is_empty() || p.to_str().is_none()) {
                return Err(err(field, "a non-empty UTF-8 path".into()));
            }
        }
        let timeout = self
            .timeout
            .unwrap_or(uvdpa_devices::blk::rbd::DEFAULT_TIMEOUT.as_secs() as u32);
        if !(1..=NBD_MAX_SECONDS).contains(&timeout) {
            return Err(err(
                "timeout",
                format!("{timeout}: 1..={NBD_MAX_SECONDS} seconds"),
            ));
        }
        Ok(RbdSpec {
            pool,
            image,
            conf,
            id,
            keyring: self.keyring.clone(),
            timeout: std::time::Duration::from_secs(u64::from(timeout)),
        })
    }

    fn validate_net(&self, name: &str, err: FieldErr<'_>) -> Result<NetSpec, ConfigError> {
        let backend_name = self.backend.as_deref().unwrap_or("loopback");
        let only = |field: &'static str, set: bool, backend: &str| {
            if set && backend_name != backend {
                Err(err(field, format!("only valid with backend {backend}")))
            } else {
                Ok(())
            }
        };
        only("tap", self.tap.is_some(), "tap")?;
        only("switch", self.switch.is_some(), "switch")?;
        only("frame_len", self.frame_len.is_some(), "source")?;
        let mac = match &self.mac {
            None => generate_mac(name),
            Some(text) => parse_mac(text).map_err(|e| err("mac", e.to_string()))?,
        };
        let mtu = self.mtu.unwrap_or(u32::from(DEFAULT_MTU));
        let mtu = u16::try_from(mtu).map_err(|_| {
            err(
                "mtu",
                format!("Invalid mtu {mtu}: must be in {MIN_MTU}..={MAX_MTU}"),
            )
        })?;
        let config = NetConfig {
            mac,
            mtu,
            max_queue_pairs: self.queue_pairs.unwrap_or(1),
            link_up: true,
        };
        config.validate().map_err(|e| {
            let field = match e {
                NetConfigError::Mtu { .. } => "mtu",
                NetConfigError::QueuePairs { .. } => "queue_pairs",
                NetConfigError::MacSyntax { .. }
                | NetConfigError::MacMulticast { .. }
                | NetConfigError::MacZero => "mac",
            };
            err(field, e.to_string())
        })?;
        let queue_size = self.queue_size.unwrap_or(256);
        if !(1..=MAX_NET_QUEUE_SIZE).contains(&queue_size) {
            return Err(err(
                "queue_size",
                format!("{queue_size}: 1..={MAX_NET_QUEUE_SIZE}"),
            ));
        }
        let backend = match backend_name {
            "loopback" => NetBackendSpec::Loopback,
            "sink" => NetBackendSpec::Sink,
            "source" => {
                let frame_len = self.frame_len.unwrap_or(NET_DEFAULT_FRAME_LEN);
                let max = u32::from(mtu) + 14;
                if frame_len < NET_MIN_FRAME_LEN || u32::from(frame_len) > max {
                    return Err(err(
                        "frame_len",
                        format!("{frame_len}: {NET_MIN_FRAME_LEN}..={max} bytes (mtu + 14)"),
                    ));
                }
                NetBackendSpec::Source { frame_len }
            }
            "tap" => {
                if let Some(t) = &self.tap {
                    if !valid_ifname(t) {
                        return Err(err(
                            "tap",
                            format!(
                                "{t:?}: an interface name of 1..=15 bytes without / : or spaces"
                            ),
                        ));
                    }
                }
                NetBackendSpec::Tap {
                    ifname: self.tap.clone(),
                }
            }
            "switch" => {
                let sw = self
                    .switch
                    .clone()
                    .ok_or_else(|| err("switch", "required for backend switch".into()))?;
                if !valid_name(&sw) {
                    return Err(err(
                        "switch",
                        format!(
                            "{sw:?}: 1 to 32 characters of A-Z a-z 0-9 _ - . (not starting with .)"
                        ),
                    ));
                }
                NetBackendSpec::Switch { name: sw }
            }
            other => {
                return Err(err(
                    "backend",
                    format!("{other:?}: one of loopback, tap, switch, sink, source"),
                ))
            }
        };
        Ok(NetSpec {
            config,
            queue_size,
            backend,
        })
    }
}

/// The embedded default: `blk0`, a 256 MiB `ram` disk with 1 queue of 256.
pub fn default_devices() -> Vec<DeviceSpec> {
    let entry = DeviceEntry {
        name: Some("blk0".into()),
        mgmtdev: Some("blk".into()),
        backend: Some("ram".into()),
        size: Some(SizeValue::Bytes(256 << 20)),
        ..DeviceEntry::default()
    };
    // The embedded entry is valid by construction; a test checks it.
    entry.validate(0).into_iter().collect()
}

/// Parses and validates a config file's text. `path` is only used in messages.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML or schema errors, [`ConfigError::Field`] for values,
/// including duplicate names.
#[cfg(test)]
pub fn parse_config(path: &Path, text: &str) -> Result<Vec<DeviceSpec>, ConfigError> {
    Ok(parse_daemon_config(path, text)?
        .devices
        .into_iter()
        .map(|(_, s)| s)
        .collect())
}

/// Parses and validates a config file's text: its devices and the daemon's settings.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML or schema errors and for a `metrics` value that is not
/// `IP:PORT`, [`ConfigError::Field`] for values, including duplicate names.
pub fn parse_daemon_config(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let metrics = file
        .metrics
        .as_deref()
        .map(|m| {
            m.parse().map_err(|_| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("metrics: {m:?} is not an address IP:PORT"),
            })
        })
        .transpose()?;
    let seccomp = file
        .seccomp
        .as_deref()
        .map(|m| {
            m.parse().map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("seccomp: {e}"),
            })
        })
        .transpose()?;
    let user = file.user;
    let mut devices: Vec<(DeviceEntry, DeviceSpec)> = Vec::new();
    for (i, entry) in file.device.into_iter().enumerate() {
        let spec = entry.validate(i)?;
        if devices.iter().any(|(_, s)| s.name == spec.name) {
            return Err(ConfigError::Field {
                device: spec.name,
                field: "name",
                reason: "duplicate device name".into(),
            });
        }
        devices.push((entry, spec));
    }
    Ok(DaemonConfig {
        devices,
        metrics,
        seccomp,
        user,
    })
}

/// Reads and validates a config file: its devices and the daemon's settings.
///
/// # Errors
/// As [`parse_daemon_config`], plus [`ConfigError::Read`].
pub fn load_daemon_config(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_daemon_config(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> (&'static str, String) {
        match parse_config(Path::new("t.toml"), text) {
            Err(ConfigError::Field { field, reason, .. }) => (field, reason),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn default_is_one_256m_ram_disk() {
        let d = default_devices();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "blk0");
        let blk = d[0].blk().unwrap();
        assert!(matches!(blk.backend, BackendSpec::Ram { size } if size == 256 << 20));
        assert_eq!(blk.num_queues, 1);
    }

    #[test]
    fn full_entry_parses() {
        let d = parse_config(
            Path::new("t"),
            r#"
            [[device]]
            name = "a"
            mgmtdev = "blk"
            backend = "null"
            size = "1G"
            queues = 4
            queue_size = 128
            read_only = true
            serial = "S1"
            logical_block_size = 4096
            mandate = ["VIRTIO_BLK_F_FLUSH", "VIRTIO_RING_F_EVENT_IDX"]
            [[device]]
            name = "b"
            mgmtdev = "blk"
            backend = "file"
            path = "/tmp/x"
            direct = true
            aio = "sync"
            "#,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        let a = d[0].blk().unwrap();
        assert!(matches!(a.backend, BackendSpec::Null { size } if size == 1 << 30));
        assert_eq!((a.num_queues, a.queue_size), (4, 128));
        assert!(a.read_only);
        assert_eq!(d[0].mandate, (1 << 9) | (1 << 29));
        assert!(matches!(
            &d[1].blk().unwrap().backend,
            BackendSpec::File {
                direct: true,
                aio: Aio::Sync,
                ..
            }
        ));
    }

    #[test]
    fn aio_is_checked_and_only_for_file_backends() {
        let file =
            "[[device]]\nname = \"f\"\nmgmtdev = \"blk\"\nbackend = \"file\"\npath = \"/x\"\n";
        let (field, reason) = field_of(&format!("{file}aio = \"native\"\n"));
        assert_eq!(
            (field, reason.as_str()),
            ("aio", "\"native\": one of io_uring, sync")
        );
        let ram = "[[device]]\nname = \"r\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        let (field, reason) = field_of(&format!("{ram}aio = \"sync\"\n"));
        assert_eq!(
            (field, reason.as_str()),
            ("aio", "only valid with backend file")
        );
        let d = parse_config(Path::new("t.toml"), file).unwrap();
        assert!(matches!(
            &d[0].blk().unwrap().backend,
            BackendSpec::File {
                aio: Aio::IoUring,
                ..
            }
        ));
    }

    #[test]
    fn nbd_entries_parse_and_each_invalid_field_is_named() {
        let d = parse_config(
            Path::new("t.toml"),
            "[[device]]\nname = \"n\"\nmgmtdev = \"blk\"\nbackend = \"nbd\"\n\
             uri = \"nbd://h:1234/e\"\nqueues = 4\nconnections = 2\n\
             reconnect_delay = 10\ntimeout = 5\n",
        )
        .unwrap();
        let BackendSpec::Nbd(n) = &d[0].blk().unwrap().backend else {
            panic!("not nbd");
        };
        assert_eq!(n.uri.to_string(), "nbd://h:1234/e");
        assert_eq!(n.connections, 2);
        assert_eq!(n.reconnect_delay, std::time::Duration::from_secs(10));
        assert_eq!(n.timeout, std::time::Duration::from_secs(5));
        let d = parse_config(
            Path::new("t.toml"),
            "[[device]]\nname = \"n\"\nmgmtdev = \"blk\"\nbackend = \"nbd\"\n\
             uri = \"nbd+unix:///?socket=/run/s\"\n",
        )
        .unwrap();
        let BackendSpec::Nbd(n) = &d[0].blk().unwrap().backend else {
            panic!("not nbd");
        };
        assert_eq!((n.connections, n.reconnect_delay.as_secs()), (1, 0));
        assert_eq!(n.timeout, NBD_DEFAULT_TIMEOUT);
        let base = "[[device]]\nname = \"n\"\nmgmtdev = \"blk\"\nbackend = \"nbd\"\n";
        let uri = "uri = \"nbd://h/e\"\n";
        for (extra, field, says) in [
            ("", "uri", "required"),
            ("uri = \"http://h/e\"", "uri", "scheme"),
            ("uri = \"nbds://h/e\"", "uri", "TLS"),
            ("uri = \"nbd+unix:///e\"", "uri", "socket=PATH"),
            (
                &format!("{uri}connections = 2"),
                "connections",
                "1..=queues (1)",
            ),
            (
                &format!("{uri}connections = 0"),
                "connections",
                "1..=queues",
            ),
            (
                &format!("{uri}reconnect_delay = 3601"),
                "reconnect_delay",
                "0..=3600",
            ),
            (&format!("{uri}timeout = 0"), "timeout", "1..=3600"),
            (
                &format!("{uri}size = \"1M\""),
                "size",
                "only valid with backend ram, null",
            ),
            (
                &format!("{uri}path = \"/x\""),
                "path",
                "only valid with backend file",
            ),
            (
                &format!("{uri}direct = true"),
                "direct",
                "only valid with backend file",
            ),
            (
                &format!("{uri}aio = \"sync\""),
                "aio",
                "only valid with backend file",
            ),
        ] {
            let (f, reason) = field_of(&format!("{base}{extra}\n"));
            assert_eq!(f, field, "{extra}: {reason}");
            assert!(reason.contains(says), "{extra}: {reason}");
        }
        let ram = "[[device]]\nname = \"r\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        for f in [
            "uri = \"nbd://h/e\"",
            "connections = 1",
            "reconnect_delay = 1",
            "timeout = 1",
        ] {
            let (field, reason) = field_of(&format!("{ram}{f}\n"));
            assert!(f.starts_with(field), "{f}: {field}");
            let owners = if field == "timeout" {
                "nbd, rbd"
            } else {
                "nbd"
            };
            assert_eq!(reason, format!("only valid with backend {owners}"));
        }
        let net = "[[device]]\nname = \"e\"\nmgmtdev = \"net\"\n";
        let (field, reason) = field_of(&format!("{net}uri = \"nbd://h/e\"\n"));
        assert_eq!(
            (field, reason.as_str()),
            ("uri", "only valid with mgmtdev blk")
        );
    }

    #[test]
    fn rbd_entries_parse_and_each_invalid_field_is_named() {
        let base = "[[device]]\nname = \"r\"\nmgmtdev = \"blk\"\nbackend = \"rbd\"\n";
        let d = parse_config(
            Path::new("t.toml"),
            &format!(
                "{base}pool = \"p\"\nimage = \"i\"\nconf = \"/c.conf\"\nid = \"u\"\n\
                 keyring = \"/k\"\ntimeout = 7\n"
            ),
        )
        .unwrap();
        let BackendSpec::Rbd(r) = &d[0].blk().unwrap().backend else {
            panic!("not rbd");
        };
        assert_eq!((r.pool.as_str(), r.image.as_str()), ("p", "i"));
        assert_eq!(r.conf, Path::new("/c.conf"));
        assert_eq!(r.id, "u");
        assert_eq!(r.keyring.as_deref(), Some(Path::new("/k")));
        assert_eq!(r.timeout, std::time::Duration::from_secs(7));
        // An rbd disk does not busy-poll unless asked to.
        assert_eq!(d[0].poll_us, 0);
        let ok = "pool = \"p\"\nimage = \"i\"\nconf = \"/c\"\n";
        let d = parse_config(Path::new("t.toml"), &format!("{base}{ok}poll_us = 32\n")).unwrap();
        assert_eq!(d[0].poll_us, 32);
        let d = parse_config(Path::new("t.toml"), &format!("{base}{ok}")).unwrap();
        let BackendSpec::Rbd(r) = &d[0].blk().unwrap().backend else {
            panic!("not rbd");
        };
        assert_eq!((r.id.as_str(), r.keyring.is_none()), ("admin", true));
        assert_eq!(r.timeout, uvdpa_devices::blk::rbd::DEFAULT_TIMEOUT);
        for (extra, field, says) in [
            ("image = \"i\"\nconf = \"/c\"", "pool", "required"),
            ("pool = \"p\"\nconf = \"/c\"", "image", "required"),
            ("pool = \"p\"\nimage = \"i\"", "conf", "required"),
            (
                "pool = \"a/b\"\nimage = \"i\"\nconf = \"/c\"",
                "pool",
                "'/'",
            ),
            (
                "pool = \"p\"\nimage = \"i@s\"\nconf = \"/c\"",
                "image",
                "'@'",
            ),
            (
                &format!("{ok}id = \"client.admin\""),
                "id",
                "without `client.`",
            ),
            (&format!("{ok}timeout = 0"), "timeout", "1..=3600"),
            (&format!("{ok}size = \"1M\""), "size", "ram, null"),
            (&format!("{ok}uri = \"nbd://h/e\""), "uri", "backend nbd"),
        ] {
            let (f, reason) = field_of(&format!("{base}{extra}\n"));
            assert_eq!(f, field, "{extra}: {reason}");
            assert!(reason.contains(says), "{extra}: {reason}");
        }
        let ram = "[[device]]\nname = \"r\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        for f in [
            "pool = \"p\"",
            "image = \"i\"",
            "conf = \"/c\"",
            "id = \"a\"",
            "keyring = \"/k\"",
        ] {
            let (field, reason) = field_of(&format!("{ram}{f}\n"));
            assert!(f.starts_with(field), "{f}: {field}");
            assert_eq!(reason, "only valid with backend rbd");
        }
    }

    #[test]
    fn transport_and_unoffer_parse_with_vduse_defaults() {
        let d = parse_config(
            Path::new("t.toml"),
            "[[device]]\nname = \"v\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n\
             transport = \"vduse\"\nunoffer = [\"VIRTIO_F_RING_PACKED\"]\n",
        )
        .unwrap();
        assert_eq!(d[0].unoffer, 1 << 34);
        // seg_max 126 × 1 MiB segments: the default bounce buffer holds the largest request.
        assert_eq!(
            d[0].transport,
            Transport::Vduse {
                bind: true,
                bounce_size: 128 << 20
            }
        );
        let d = parse_config(
            Path::new("t.toml"),
            "[[device]]\nname = \"v\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n",
        )
        .unwrap();
        assert_eq!(d[0].transport, Transport::VhostUser);
        assert_eq!((d[0].unoffer, d[0].poll_us), (0, BLK_DEFAULT_POLL_US));
        // VDUSE withholds packed rings by default and does not poll.
        let vduse =
            "[[device]]\nname = \"v\"\nmgmtdev = \"blk\"\nsize = \"1M\"\ntransport = \"vduse\"\n";
        let d = parse_config(Path::new("t.toml"), vduse).unwrap();
        assert_eq!((d[0].unoffer, d[0].poll_us), (VDUSE_DEFAULT_UNOFFER, 0));
        let d = parse_config(Path::new("t.toml"), &format!("{vduse}unoffer = []\n")).unwrap();
        assert_eq!(d[0].unoffer, 0);
    }

    #[test]
    fn max_memory_defaults_to_4t_and_takes_sizes() {
        let base = "[[device]]\nname = \"m\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        let d = parse_config(Path::new("t.toml"), base).unwrap();
        assert_eq!(d[0].max_memory, 4 << 40);
        for (v, bytes) in [
            ("\"1T\"", 1u64 << 40),
            ("\"128T\"", 128 << 40),
            ("1048576", 1 << 20),
        ] {
            let d =
                parse_config(Path::new("t.toml"), &format!("{base}max_memory = {v}\n")).unwrap();
            assert_eq!(d[0].max_memory, bytes, "{v}");
        }
    }

    #[test]
    fn each_invalid_field_is_named() {
        let base = "[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        for (extra, field) in [
            ("queues = 0", "queues"),
            ("queues = 65", "queues"),
            ("queue_size = 100", "queue_size"),
            ("logical_block_size = 513", "logical_block_size"),
            ("serial = \"012345678901234567890\"", "serial"),
            ("backend = \"tape\"", "backend"),
            ("path = \"/x\"", "path"),
            ("mandate = [\"VIRTIO_F_TELEPATHY\"]", "mandate"),
            ("poll_us = 2000000", "poll_us"),
            ("coalesce_usecs = 5000000", "coalesce_usecs"),
            ("unoffer = [\"VIRTIO_F_VERSION_1\"]", "unoffer"),
            ("unoffer = [\"VIRTIO_F_TELEPATHY\"]", "unoffer"),
            (
                "mandate = [\"VIRTIO_BLK_F_FLUSH\"]\nunoffer = [\"VIRTIO_BLK_F_FLUSH\"]",
                "unoffer",
            ),
            ("transport = \"pigeon\"", "transport"),
            ("bind = \"vduse\"", "bind"),
            ("transport = \"vduse\"\nbind = \"later\"", "bind"),
            ("transport = \"vduse\"\nbounce_size = \"1M\"", "bounce_size"),
            ("transport = \"vduse\"\nbounce_size = \"2G\"", "bounce_size"),
            ("max_memory = \"512K\"", "max_memory"),
            ("max_memory = \"129T\"", "max_memory"),
            ("max_memory = \"lots\"", "max_memory"),
            ("transport = \"vduse\"\nmax_memory = \"1T\"", "max_memory"),
        ] {
            assert_eq!(field_of(&format!("{base}{extra}\n")).0, field, "{extra}");
        }
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"1000\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"12Q\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a b\"\nmgmtdev = \"blk\"\nsize = 512\n").0,
            "name"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"gpu\"\nsize = 512\n").0,
            "mgmtdev"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nbackend = \"file\"\n").0,
            "path"
        );
        let dup = format!("{base}{base}");
        assert_eq!(field_of(&dup), ("name", "duplicate device name".into()));
    }

    #[test]
    fn net_entry_parses_with_defaults() {
        let d = parse_config(
            Path::new("t"),
            "[[device]]\nname = \"n0\"\nmgmtdev = \"net\"\n",
        )
        .unwrap();
        assert_eq!(d[0].mgmtdev(), "net");
        let n = d[0].net().unwrap();
        assert_eq!(n.backend, NetBackendSpec::Loopback);
        assert_eq!(n.config.mac, generate_mac("n0"));
        assert_eq!(n.config.mac[0] & 3, 2, "locally administered unicast");
        assert_eq!((n.config.mtu, n.config.max_queue_pairs), (1500, 1));
        assert_eq!(n.queue_size, 256);
        assert_eq!(d[0].num_queues(), 3);
    }

    #[test]
    fn full_net_entries_parse() {
        let d = parse_config(
            Path::new("t"),
            r#"
            [[device]]
            name = "n1"
            mgmtdev = "net"
            backend = "source"
            mac = "02:00:00:00:00:01"
            mtu = 9000
            queue_pairs = 4
            queue_size = 1000
            frame_len = 1518
            mandate = ["VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_F_VERSION_1"]
            poll_us = 50
            [[device]]
            name = "n2"
            mgmtdev = "net"
            backend = "switch"
            switch = "sw0"
            [[device]]
            name = "n3"
            mgmtdev = "net"
            backend = "tap"
            tap = "tap-n3"
            [[device]]
            name = "n4"
            mgmtdev = "net"
            backend = "sink"
            "#,
        )
        .unwrap();
        let n1 = d[0].net().unwrap();
        assert_eq!(n1.config.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!((n1.config.mtu, n1.config.max_queue_pairs), (9000, 4));
        assert_eq!(n1.queue_size, 1000);
        assert_eq!(n1.backend, NetBackendSpec::Source { frame_len: 1518 });
        assert_eq!(d[0].mandate, (1 << 15) | (1 << 32));
        assert_eq!(d[0].num_queues(), 9);
        assert_eq!(
            d[1].net().unwrap().backend,
            NetBackendSpec::Switch { name: "sw0".into() }
        );
        assert_eq!(
            d[2].net().unwrap().backend,
            NetBackendSpec::Tap {
                ifname: Some("tap-n3".into())
            }
        );
        assert_eq!(d[3].net().unwrap().backend, NetBackendSpec::Sink);
    }

    #[test]
    fn each_invalid_net_field_is_named() {
        let base = "[[device]]\nname = \"n\"\nmgmtdev = \"net\"\n";
        for (extra, field) in [
            ("mac = \"02:00:00:00:00\"", "mac"),
            ("mac = \"zz:00:00:00:00:01\"", "mac"),
            ("mac = \"01:00:5e:00:00:01\"", "mac"),
            ("mac = \"00:00:00:00:00:00\"", "mac"),
            ("mtu = 67", "mtu"),
            ("mtu = 65536", "mtu"),
            ("queue_pairs = 0", "queue_pairs"),
            ("queue_pairs = 17", "queue_pairs"),
            ("queue_size = 0", "queue_size"),
            ("backend = \"switch\"", "switch"),
            ("backend = \"switch\"\nswitch = \"a b\"", "switch"),
            ("backend = \"tap\"\ntap = \"sixteen-bytes-xx\"", "tap"),
            ("tap = \"t0\"", "tap"),
            ("switch = \"sw\"", "switch"),
            ("frame_len = 64", "frame_len"),
            ("backend = \"source\"\nframe_len = 59", "frame_len"),
            (
                "backend = \"source\"\nmtu = 100\nframe_len = 115",
                "frame_len",
            ),
            ("backend = \"ram\"", "backend"),
            ("mandate = [\"VIRTIO_BLK_F_FLUSH\"]", "mandate"),
            ("size = \"1M\"", "size"),
            ("path = \"/x\"", "path"),
            ("serial = \"s\"", "serial"),
            ("read_only = true", "read_only"),
            ("queues = 2", "queues"),
            ("logical_block_size = 512", "logical_block_size"),
            ("direct = true", "direct"),
            ("aio = \"sync\"", "aio"),
        ] {
            assert_eq!(field_of(&format!("{base}{extra}\n")).0, field, "{extra}");
        }
        let (_, reason) = field_of(&format!("{base}size = 512\n"));
        assert_eq!(reason, "only valid with mgmtdev blk");
        let blk = "[[device]]\nname = \"b\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        for f in [
            "mac = \"02:00:00:00:00:01\"",
            "mtu = 1500",
            "queue_pairs = 2",
            "tap = \"t\"",
            "switch = \"s\"",
            "frame_len = 64",
        ] {
            let (field, reason) = field_of(&format!("{blk}{f}\n"));
            assert!(f.starts_with(field), "{f}: {field}");
            assert!(
                reason.starts_with("only valid with mgmtdev net"),
                "{reason}"
            );
        }
        assert_eq!(
            field_of(&format!("{blk}mandate = [\"VIRTIO_NET_F_MRG_RXBUF\"]\n")).0,
            "mandate"
        );
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_parse_errors() {
        for text in [
            "[[device]]\nnmae = \"a\"\n",
            "[[device]\n",
            "[[device]]\nqueues = \"x\"\n",
        ] {
            assert!(matches!(
                parse_config(Path::new("t"), text),
                Err(ConfigError::Parse { .. })
            ));
        }
    }

    #[test]
    fn feature_names_are_per_device_type() {
        assert_eq!(feature_bit("net", "VIRTIO_F_VERSION_1"), Some(1 << 32));
        assert_eq!(feature_bit("net", "VIRTIO_NET_F_HOST_ECN"), Some(1 << 13));
        assert_eq!(feature_bit("blk", "VIRTIO_BLK_F_DISCARD"), Some(1 << 13));
        assert_eq!(
            feature_bit("net", "VIRTIO_NET_F_SPEED_DUPLEX"),
            Some(1 << 63)
        );
        assert_eq!(feature_bit("blk", "VIRTIO_NET_F_MQ"), None);
        assert_eq!(feature_bit("net", "VIRTIO_BLK_F_MQ"), None);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
    }
}
