//! The virtio-net control virtqueue (virtio 1.2 §5.1.6.5) and the state it records.
//!
//! A request is `{u8 class, u8 command}` followed by command-specific data (device-
//! readable), then a device-writable `u8 ack` (`VIRTIO_NET_OK` / `VIRTIO_NET_ERR`)
//! optionally followed by a command-specific result. The ack is written to the *first*
//! device-writable byte, where `struct virtio_net_ctrl` puts it (drivers that supply
//! exactly one writable byte, as Linux and DPDK do for these commands, see no difference
//! from "last"); the used length is 1.
//!
//! Commands, each accepted only with its feature negotiated:
//!
//! | class | commands | data | feature |
//! |---|---|---|---|
//! | `VIRTIO_NET_CTRL_RX` (0) | PROMISC 0, ALLMULTI 1 | `u8` 0/1 | CTRL_RX |
//! | | ALLUNI 2, NOMULTI 3, NOUNI 4, NOBCAST 5 | `u8` 0/1 | CTRL_RX_EXTRA |
//! | `VIRTIO_NET_CTRL_MAC` (1) | TABLE_SET 0 | two `{le32 n, u8 macs[n][6]}` | CTRL_RX |
//! | | ADDR_SET 1 | `u8 mac[6]` | CTRL_MAC_ADDR |
//! | `VIRTIO_NET_CTRL_VLAN` (2) | ADD 0, DEL 1 | `le16` VLAN id < 4096 | CTRL_VLAN |
//! | `VIRTIO_NET_CTRL_ANNOUNCE` (3) | ACK 0 | none | GUEST_ANNOUNCE |
//! | `VIRTIO_NET_CTRL_MQ` (4) | VQ_PAIRS_SET 0 | `le16` 1..=max pairs | MQ |
//! | `VIRTIO_NET_CTRL_GUEST_OFFLOADS` (5) | SET 0 | `le64` offload bits | CTRL_GUEST_OFFLOADS |
//!
//! Everything else — an unknown class or command, data of the wrong length, a value out of
//! range, a command whose feature was not negotiated — is answered `VIRTIO_NET_ERR` and
//! changes nothing; a MAC table whose addresses are of the wrong kind (a multicast address
//! in the unicast table or the reverse) is refused likewise. A chain without a writable
//! byte cannot be answered: it is completed with used length 0. Either way the cause is
//! logged at debug level, rate-limited. Nothing a driver sends makes the handler fail.
//!
//! The recorded state lives in a [`NetCtrlState`] shared (`Arc`) by the control queue
//! handler, which writes it, and the data path, which reads it: atomics only, no lock on
//! the read side, so a receive worker can consult the filter for every frame.

use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use uvdpa_virtio::worker::{DeviceFault, QueueHandler};
use uvdpa_virtio::{DescriptorChain, VirtioFeatures};

use super::config::{
    is_broadcast, is_multicast, MacAddr, NetConfig, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use crate::ratelimit::{guest_debug, RateLimiter};

/// `ack`: the command succeeded.
pub const VIRTIO_NET_OK: u8 = 0;
/// `ack`: the command failed (and changed nothing).
pub const VIRTIO_NET_ERR: u8 = 1;

/// Class: receive modes.
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// RX command: promiscuous mode on/off.
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// RX command: receive all multicast on/off.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// RX command: receive all unicast on/off.
pub const VIRTIO_NET_CTRL_RX_ALLUNI: u8 = 2;
/// RX command: suppress multicast receive on/off.
pub const VIRTIO_NET_CTRL_RX_NOMULTI: u8 = 3;
/// RX command: suppress unicast receive on/off.
pub const VIRTIO_NET_CTRL_RX_NOUNI: u8 = 4;
/// RX command: suppress broadcast receive on/off.
pub const VIRTIO_NET_CTRL_RX_NOBCAST: u8 = 5;

/// Class: MAC address filtering.
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// MAC command: set the unicast and multicast filter tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// MAC command: set the device's (default) MAC address.
pub const VIRTIO_NET_CTRL_MAC_ADDR_SET: u8 = 1;

/// Class: VLAN filtering.
pub const VIRTIO_NET_CTRL_VLAN: u8 = 2;
/// VLAN command: add a VLAN id to the filter.
pub const VIRTIO_NET_CTRL_VLAN_ADD: u8 = 0;
/// VLAN command: remove a VLAN id from the filter.
pub const VIRTIO_NET_CTRL_VLAN_DEL: u8 = 1;

/// Class: gratuitous packet announcement.
pub const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
/// ANNOUNCE command: the driver has announced itself.
pub const VIRTIO_NET_CTRL_ANNOUNCE_ACK: u8 = 0;

/// Class: multiqueue.
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// MQ command: number of queue pairs in use (automatic receive steering).
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

/// Class: guest offloads.
pub const VIRTIO_NET_CTRL_GUEST_OFFLOADS: u8 = 5;
/// GUEST_OFFLOADS command: set the offloads the driver accepts now.
pub const VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: u8 = 0;

/// Entries kept per MAC filter table (unicast, multicast). A longer table is accepted and
/// turns into "accept every address of that kind" (the spec's footnote allows falling back
/// to all-multicast / promiscuous).
pub const MAC_TABLE_ENTRIES: usize = 64;
/// VLAN ids (12 bits).
pub const VLAN_IDS: u16 = 4096;

/// Guest offload feature bits VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may toggle (§5.1.6.5.6):
/// GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO, GUEST_USO4 (54), GUEST_USO6
/// (55).
pub const GUEST_OFFLOAD_BITS: u64 =
    (1 << 1) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 54) | (1 << 55);

/// Guest-caused debug messages logged per second per device, at most.
const LOG_PER_SEC: u32 = 10;
/// Bytes of the `{class, command}` header.
const CTRL_HDR_LEN: u64 = 2;
/// `guest_offloads` before the driver set any: everything negotiated is on.
const OFFLOADS_AS_NEGOTIATED: u64 = u64::MAX;

/// The receive modes set with `VIRTIO_NET_CTRL_RX` (§5.1.6.5.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMode {
    /// Receive every frame.
    pub promisc: bool,
    /// Receive every multicast frame.
    pub allmulti: bool,
    /// Receive every unicast frame.
    pub alluni: bool,
    /// Receive no multicast frame (broadcast excepted).
    pub nomulti: bool,
    /// Receive no unicast frame.
    pub nouni: bool,
    /// Receive no broadcast frame.
    pub nobcast: bool,
}

const PROMISC: u8 = 1 << VIRTIO_NET_CTRL_RX_PROMISC;
const ALLMULTI: u8 = 1 << VIRTIO_NET_CTRL_RX_ALLMULTI;
const ALLUNI: u8 = 1 << VIRTIO_NET_CTRL_RX_ALLUNI;
const NOMULTI: u8 = 1 << VIRTIO_NET_CTRL_RX_NOMULTI;
const NOUNI: u8 = 1 << VIRTIO_NET_CTRL_RX_NOUNI;
const NOBCAST: u8 = 1 << VIRTIO_NET_CTRL_RX_NOBCAST;

impl RxMode {
    fn from_bits(b: u8) -> Self {
        Self {
            promisc: b & PROMISC != 0,
            allmulti: b & ALLMULTI != 0,
            alluni: b & ALLUNI != 0,
            nomulti: b & NOMULTI != 0,
            nouni: b & NOUNI != 0,
            nobcast: b & NOBCAST != 0,
        }
    }
}

/// A snapshot of the MAC filter tables (for tools; the data path uses
/// [`NetCtrlState::rx_filter_accepts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacTable {
    /// Unicast addresses kept (at most [`MAC_TABLE_ENTRIES`]).
    pub unicast: Vec<MacAddr>,
    /// The driver gave more unicast addresses than are kept: every unicast is accepted.
    pub unicast_overflow: bool,
    /// Multicast addresses kept (at most [`MAC_TABLE_ENTRIES`]).
    pub multicast: Vec<MacAddr>,
    /// The driver gave more multicast addresses than are kept: every multicast is
    /// accepted.
    pub multicast_overflow: bool,
}

/// What the control queue has set, shared by the control queue handler (the only writer
/// while a driver runs) and the data path (readers).
///
/// All fields are atomics. Single values (MAC, queue pairs, modes, offloads, the VLAN
/// bitmap words) are read with relaxed loads; the MAC filter tables are read consistently
/// through a sequence lock (readers retry while an update is in progress, writers
/// serialize on a mutex that readers never take). [`NetCtrlState::generation`] grows with
/// every change, so a data path can cache what it derives (say, TAP offloads) and recompute
/// only when it moves. A command's effect is stored before its ack is written, so it is
/// visible before the driver sees the buffer used (§5.1.6.5.2: "MUST update ... before it
/// consumes the command").
///
/// Values after [`NetCtrlState::new`] and [`NetCtrlState::reset`] (a device reset):
/// MAC as configured, 1 active queue pair (multiqueue starts disabled, §5.1.6.5.5),
/// promiscuous mode *on* (as QEMU, so a driver without VIRTIO_NET_F_CTRL_RX, which cannot
/// configure the filter, receives everything; Linux turns it off at open), the other modes
/// off, MAC tables empty (§5.1.6.5.2), VLAN table empty, offloads as negotiated, no
/// announcement pending.
#[derive(Debug)]
pub struct NetCtrlState {
    config_mac: MacAddr,
    max_queue_pairs: u16,
    mac: AtomicU64,
    active_pairs: AtomicU16,
    rx_mode: AtomicU8,
    announce: AtomicBool,
    guest_offloads: AtomicU64,
    vlans: [AtomicU64; VLAN_IDS as usize / 64],
    /// Sequence lock over the MAC tables: odd while an update is in progress.
    table_seq: AtomicU64,
    /// Addresses the driver gave per table (may exceed [`MAC_TABLE_ENTRIES`]).
    uni_len: AtomicU32,
    multi_len: AtomicU32,
    uni: [AtomicU64; MAC_TABLE_ENTRIES],
    multi: [AtomicU64; MAC_TABLE_ENTRIES],
    generation: AtomicU64,
    /// Serializes writers (the handler, a reset).
    write: Mutex<()>,
    log: RateLimiter,
}

/// A MAC address as the low 48 bits of a `u64`.
fn mac_to_u64(m: &MacAddr) -> u64 {
    u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

fn u64_to_mac(v: u64) -> MacAddr {
    let b = v.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

impl NetCtrlState {
    /// The reset state of a device configured with `config`.
    pub fn new(config: &NetConfig) -> Self {
        Self {
            config_mac: config.mac,
            max_queue_pairs: config.max_queue_pairs.max(1),
            mac: AtomicU64::new(mac_to_u64(&config.mac)),
            active_pairs: AtomicU16::new(1),
            rx_mode: AtomicU8::new(PROMISC),
            announce: AtomicBool::new(false),
            guest_offloads: AtomicU64::new(OFFLOADS_AS_NEGOTIATED),
            vlans: std::array::from_fn(|_| AtomicU64::new(0)),
            table_seq: AtomicU64::new(0),
            uni_len: AtomicU32::new(0),
            multi_len: AtomicU32::new(0),
            uni: std::array::from_fn(|_| AtomicU64::new(0)),
            multi: std::array::from_fn(|_| AtomicU64::new(0)),
            generation: AtomicU64::new(0),
            write: Mutex::new(()),
            log: RateLimiter::new(LOG_PER_SEC),
        }
    }

    /// Returns every value to its reset state (see the type's documentation). Call on a
    /// device reset, before the next driver's queues start.
    pub fn reset(&self) {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        self.mac
            .store(mac_to_u64(&self.config_mac), Ordering::Relaxed);
        self.active_pairs.store(1, Ordering::Relaxed);
        self.rx_mode.store(PROMISC, Ordering::Relaxed);
        self.announce.store(false, Ordering::Relaxed);
        self.guest_offloads
            .store(OFFLOADS_AS_NEGOTIATED, Ordering::Relaxed);
        for w in &self.vlans {
            w.store(0, Ordering::Relaxed);
        }
        self.write_tables(&[], 0, &[], 0);
        self.bump();
    }

    /// Queue pairs the device has (`max_virtqueue_pairs`).
    pub fn max_queue_pairs(&self) -> u16 {
        self.max_queue_pairs
    }

    /// Queue pairs the driver uses (VQ_PAIRS_SET), 1..=[`NetCtrlState::max_queue_pairs`].
    /// Frames should be received only on these pairs' receive queues.
    pub fn active_queue_pairs(&self) -> u16 {
        self.active_pairs.load(Ordering::Relaxed)
    }

    /// The device's current MAC address: the configured one, or the last MAC_ADDR_SET.
    /// With VIRTIO_NET_F_MAC negotiated the config space `mac` must show this one
    /// (§5.1.6.5.2).
    pub fn mac(&self) -> MacAddr {
        u64_to_mac(self.mac.load(Ordering::Relaxed))
    }

    /// The receive modes.
    pub fn rx_mode(&self) -> RxMode {
        RxMode::from_bits(self.rx_mode.load(Ordering::Relaxed))
    }

    /// Asks the driver to announce itself (after a migration, for example): sets
    /// VIRTIO_NET_S_ANNOUNCE in [`NetCtrlState::status`] until the driver's ANNOUNCE_ACK.
    /// The caller raises the configuration change interrupt.
    pub fn request_announce(&self) {
        self.announce.store(true, Ordering::Relaxed);
        self.bump();
    }

    /// Whether an announcement is pending (VIRTIO_NET_S_ANNOUNCE).
    pub fn announce_pending(&self) -> bool {
        self.announce.load(Ordering::Relaxed)
    }

    /// The config space `status`: [`VIRTIO_NET_S_LINK_UP`] when `link_up`, plus
    /// [`VIRTIO_NET_S_ANNOUNCE`] while an announcement is pending.
    pub fn status(&self, link_up: bool) -> u16 {
        let mut s = if link_up { VIRTIO_NET_S_LINK_UP } else { 0 };
        if self.announce_pending() {
            s |= VIRTIO_NET_S_ANNOUNCE;
        }
        s
    }

    /// The config space of a device configured with `config` as the driver must see it
    /// now: `mac` from [`NetCtrlState::mac`] (MAC_ADDR_SET changes it, §5.1.6.5.2) and
    /// `status` from [`NetCtrlState::status`] (the announce bit).
    pub fn config_space(&self, config: &NetConfig) -> Vec<u8> {
        let mut c = config.virtio_config();
        c.mac = self.mac();
        c.status = self.status(config.link_up);
        c.to_le_bytes().to_vec()
    }

    /// The guest offloads in force: those of `negotiated` (the guest offload bits,
    /// [`GUEST_OFFLOAD_BITS`]) until the driver sets others with
    /// VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, then those. The backend must not deliver frames
    /// needing an offload outside this set (a TAP: `Tap::set_offload` with it).
    pub fn guest_offloads(&self, negotiated: VirtioFeatures) -> VirtioFeatures {
        match self.guest_offloads.load(Ordering::Relaxed) {
            OFFLOADS_AS_NEGOTIATED => {
                VirtioFeatures::from_raw(negotiated.bits() & GUEST_OFFLOAD_BITS)
            }
            set => VirtioFeatures::from_raw(set),
        }
    }

    /// Whether frames tagged with VLAN `vid` pass the VLAN filter. Meaningful only with
    /// VIRTIO_NET_F_CTRL_VLAN negotiated (otherwise every tagged frame passes, §5.1.6.5.3);
    /// the table starts empty. Ids of 4096 and above are never in the table.
    pub fn vlan_allowed(&self, vid: u16) -> bool {
        let Some(word) = self.vlans.get(usize::from(vid / 64)) else {
            return false;
        };
        vid < VLAN_IDS && word.load(Ordering::Relaxed) & (1 << (vid % 64)) != 0
    }

    /// Whether a frame for destination `dst` should be delivered to the driver under the
    /// receive modes and MAC tables (§5.1.6.5.1, §5.1.6.5.2):
    ///
    /// - promiscuous: everything;
    /// - broadcast: unless NOBCAST;
    /// - multicast: unless NOMULTI, if ALLMULTI or the address is in the multicast table
    ///   (or that table overflowed);
    /// - unicast: unless NOUNI, if ALLUNI or the address is the device's
    ///   ([`NetCtrlState::mac`]) or in the unicast table (or that table overflowed).
    ///
    /// Lock-free; allocation-free.
    pub fn rx_filter_accepts(&self, dst: &MacAddr) -> bool {
        let m = self.rx_mode.load(Ordering::Relaxed);
        if m & PROMISC != 0 {
            return true;
        }
        if is_broadcast(dst) {
            return m & NOBCAST == 0;
        }
        let key = mac_to_u64(dst);
        if is_multicast(dst) {
            m & NOMULTI == 0 && (m & ALLMULTI != 0 || self.table_contains(key, true))
        } else {
            m & NOUNI == 0
                && (m & ALLUNI != 0
                    || key == self.mac.load(Ordering::Relaxed)
                    || self.table_contains(key, false))
        }
    }

    /// The MAC filter tables.
    pub fn mac_table(&self) -> MacTable {
        loop {
            let s1 = self.table_seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let read = |len: &AtomicU32, entries: &[AtomicU64]| {
                    let n = len.load(Ordering::Relaxed) as usize;
                    let kept: Vec<MacAddr> = entries
                        .iter()
                        .take(n)
                        .map(|e| u64_to_mac(e.load(Ordering::Relaxed)))
                        .collect();
                    (kept, n > entries.len())
                };
                let (unicast, unicast_overflow) = read(&self.uni_len, &self.uni);
                let (multicast, multicast_overflow) = read(&self.multi_len, &self.multi);
                fence(Ordering::Acquire);
                if self.table_seq.load(Ordering::Relaxed) == s1 {
                    return MacTable {
                        unicast,
                        unicast_overflow,
                        multicast,
                        multicast_overflow,
                    };
                }
            }
            std::hint::spin_loop();
        }
    }

    /// A counter that grows with every change the control queue (or a reset) makes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether `key` is in a table, or the table overflowed.
    fn table_contains(&self, key: u64, multicast: bool) -> bool {
        let (len, entries) = if multicast {
            (&self.multi_len, &self.multi)
        } else {
            (&self.uni_len, &self.uni)
        };
        loop {
            let s1 = self.table_seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let n = len.load(Ordering::Relaxed) as usize;
                let found = n > entries.len()
                    || entries
                        .iter()
                        .take(n)
                        .any(|e| e.load(Ordering::Relaxed) == key);
                fence(Ordering::Acquire);
                if self.table_seq.load(Ordering::Relaxed) == s1 {
                    return found;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Replaces both tables; `*_given` are the entry counts the driver sent (the slices
    /// hold the kept ones). The caller holds `write`.
    fn write_tables(&self, uni: &[u64], uni_given: u32, multi: &[u64], multi_given: u32) {
        let s = self.table_seq.load(Ordering::Relaxed);
        self.table_seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (slot, v) in self.uni.iter().zip(uni) {
            slot.store(*v, Ordering::Relaxed);
        }
        for (slot, v) in self.multi.iter().zip(multi) {
            slot.store(*v, Ordering::Relaxed);
        }
        self.uni_len.store(uni_given, Ordering::Relaxed);
        self.multi_len.store(multi_given, Ordering::Relaxed);
        self.table_seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

/// Why a control command was answered `VIRTIO_NET_ERR` (logged, never returned).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
enum CtrlError {
    #[error("{len}-byte request, shorter than the 2-byte class/command header")]
    Short { len: u32 },
    #[error("unknown class {class}")]
    UnknownClass { class: u8 },
    #[error("unknown command {command} of class {class}")]
    UnknownCommand { class: u8, command: u8 },
    #[error("class {class} command {command} needs {feature}, which was not negotiated")]
    NotNegotiated {
        class: u8,
        command: u8,
        feature: &'static str,
    },
    #[error("class {class} command {command}: {len} bytes of data, expected {expected}")]
    DataLength {
        class: u8,
        command: u8,
        len: u64,
        expected: u64,
    },
    #[error("class {class} command {command}: value {value} is not 0 (off) or 1 (on)")]
    OnOff { class: u8, command: u8, value: u8 },
    #[error("MAC table: {table} table truncated at byte {at} of {len}")]
    MacTableTruncated {
        table: &'static str,
        at: u64,
        len: u64,
    },
    #[error("MAC table: entry {index} of the {table} table has the wrong kind")]
    MacTableKind { table: &'static str, index: u32 },
    #[error("MAC_ADDR_SET: a multicast or all-zero address is no device address")]
    MacAddr,
    #[error("VQ_PAIRS_SET {value}: must be in 1..={max}")]
    QueuePairs { value: u16, max: u16 },
    #[error("VLAN id {vid}: must be below {VLAN_IDS}")]
    VlanId { vid: u16 },
    #[error(
        "GUEST_OFFLOADS_SET {value:#x}: only negotiated guest offloads {allowed:#x} may be set"
    )]
    Offloads { value: u64, allowed: u64 },
}

/// The control queue's [`QueueHandler`]: executes each command against a shared
/// [`NetCtrlState`] and writes its ack.
#[derive(Debug)]
pub struct CtrlHandler {
    state: Arc<NetCtrlState>,
    features: VirtioFeatures,
    max_queue_pairs: u16,
}

impl CtrlHandler {
    /// A handler for a driver that negotiated `features`, on a device with
    /// `max_queue_pairs` queue pairs (bounded by the state's own). Creating it changes no
    /// state: a device reset is [`NetCtrlState::reset`].
    pub fn new(state: Arc<NetCtrlState>, features: VirtioFeatures, max_queue_pairs: u16) -> Self {
        let max_queue_pairs = max_queue_pairs.clamp(1, state.max_queue_pairs());
        Self {
            state,
            features,
            max_queue_pairs,
        }
    }

    /// The state this handler records into.
    pub fn state(&self) -> &Arc<NetCtrlState> {
        &self.state
    }

    fn require(
        &self,
        class: u8,
        command: u8,
        f: VirtioFeatures,
        name: &'static str,
    ) -> Result<(), CtrlError> {
        if self.features.contains(f) {
            Ok(())
        } else {
            Err(CtrlError::NotNegotiated {
                class,
                command,
                feature: name,
            })
        }
    }

    /// Executes the command of `chain`; `Ok` means VIRTIO_NET_OK.
    fn execute(&self, chain: &DescriptorChain) -> Result<(), CtrlError> {
        let len = chain.readable_len();
        let mut hdr = [0u8; 2];
        if u64::from(len) < CTRL_HDR_LEN || chain.read_at(0, &mut hdr) < 2 {
            return Err(CtrlError::Short { len });
        }
        let [class, command] = hdr;
        let st = &*self.state;
        match class {
            VIRTIO_NET_CTRL_RX => {
                let (bit, feature, name) = match command {
                    VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI => (
                        1u8 << command,
                        VirtioFeatures::VIRTIO_NET_F_CTRL_RX,
                        "VIRTIO_NET_F_CTRL_RX",
                    ),
                    VIRTIO_NET_CTRL_RX_ALLUNI..=VIRTIO_NET_CTRL_RX_NOBCAST => (
                        1u8 << command,
                        VirtioFeatures::VIRTIO_NET_F_CTRL_RX_EXTRA,
                        "VIRTIO_NET_F_CTRL_RX_EXTRA",
                    ),
                    _ => return Err(CtrlError::UnknownCommand { class, command }),
                };
                self.require(class, command, feature, name)?;
                let [value] = data::<1>(chain, class, command)?;
                let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                match value {
                    0 => st.rx_mode.fetch_and(!bit, Ordering::Relaxed),
                    1 => st.rx_mode.fetch_or(bit, Ordering::Relaxed),
                    _ => {
                        return Err(CtrlError::OnOff {
                            class,
                            command,
                            value,
                        })
                    }
                };
            }
            VIRTIO_NET_CTRL_MAC => match command {
                VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                    self.require(
                        class,
                        command,
                        VirtioFeatures::VIRTIO_NET_F_CTRL_RX,
                        "VIRTIO_NET_F_CTRL_RX",
                    )?;
                    let total = u64::from(len);
                    let mut at = CTRL_HDR_LEN;
                    let mut uni = [0u64; MAC_TABLE_ENTRIES];
                    let mut multi = [0u64; MAC_TABLE_ENTRIES];
                    let n_uni = read_mac_table(chain, &mut at, total, false, &mut uni)?;
                    let n_multi = read_mac_table(chain, &mut at, total, true, &mut multi)?;
                    if at != total {
                        return Err(CtrlError::DataLength {
                            class,
                            command,
                            len: total - CTRL_HDR_LEN,
                            expected: at - CTRL_HDR_LEN,
                        });
                    }
                    let kept = |n: u32| (n as usize).min(MAC_TABLE_ENTRIES);
                    let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                    st.write_tables(&uni[..kept(n_uni)], n_uni, &multi[..kept(n_multi)], n_multi);
                }
                VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                    self.require(
                        class,
                        command,
                        VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR,
                        "VIRTIO_NET_F_CTRL_MAC_ADDR",
                    )?;
                    let mac = data::<6>(chain, class, command)?;
                    if is_multicast(&mac) || mac == [0; 6] {
                        return Err(CtrlError::MacAddr);
                    }
                    let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                    st.mac.store(mac_to_u64(&mac), Ordering::Relaxed);
                }
                _ => return Err(CtrlError::UnknownCommand { class, command }),
            },
            VIRTIO_NET_CTRL_VLAN => {
                if command > VIRTIO_NET_CTRL_VLAN_DEL {
                    return Err(CtrlError::UnknownCommand { class, command });
                }
                self.require(
                    class,
                    command,
                    VirtioFeatures::VIRTIO_NET_F_CTRL_VLAN,
                    "VIRTIO_NET_F_CTRL_VLAN",
                )?;
                let vid = u16::from_le_bytes(data::<2>(chain, class, command)?);
                let word = st
                    .vlans
                    .get(usize::from(vid / 64))
                    .filter(|_| vid < VLAN_IDS)
                    .ok_or(CtrlError::VlanId { vid })?;
                let bit = 1u64 << (vid % 64);
                let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                if command == VIRTIO_NET_CTRL_VLAN_ADD {
                    word.fetch_or(bit, Ordering::Relaxed);
                } else {
                    word.fetch_and(!bit, Ordering::Relaxed);
                }
            }
            VIRTIO_NET_CTRL_ANNOUNCE => {
                if command != VIRTIO_NET_CTRL_ANNOUNCE_ACK {
                    return Err(CtrlError::UnknownCommand { class, command });
                }
                self.require(
                    class,
                    command,
                    VirtioFeatures::VIRTIO_NET_F_GUEST_ANNOUNCE,
                    "VIRTIO_NET_F_GUEST_ANNOUNCE",
                )?;
                data::<0>(chain, class, command)?;
                let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                st.announce.store(false, Ordering::Relaxed);
            }
            VIRTIO_NET_CTRL_MQ => {
                if command != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
                    return Err(CtrlError::UnknownCommand { class, command });
                }
                self.require(
                    class,
                    command,
                    VirtioFeatures::VIRTIO_NET_F_MQ,
                    "VIRTIO_NET_F_MQ",
                )?;
                let value = u16::from_le_bytes(data::<2>(chain, class, command)?);
                let max = self.max_queue_pairs;
                if !(1..=max).contains(&value) {
                    return Err(CtrlError::QueuePairs { value, max });
                }
                let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                st.active_pairs.store(value, Ordering::Relaxed);
            }
            VIRTIO_NET_CTRL_GUEST_OFFLOADS => {
                if command != VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET {
                    return Err(CtrlError::UnknownCommand { class, command });
                }
                self.require(
                    class,
                    command,
                    VirtioFeatures::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
                    "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
                )?;
                let value = u64::from_le_bytes(data::<8>(chain, class, command)?);
                let allowed = self.features.bits() & GUEST_OFFLOAD_BITS;
                if value & !allowed != 0 {
                    return Err(CtrlError::Offloads { value, allowed });
                }
                let _w = st.write.lock().unwrap_or_else(PoisonError::into_inner);
                st.guest_offloads.store(value, Ordering::Relaxed);
            }
            _ => return Err(CtrlError::UnknownClass { class }),
        }
        st.bump();
        Ok(())
    }
}

/// Reads the command data of a fixed-size command: the request must be exactly the header
/// and `N` bytes.
fn data<const N: usize>(
    chain: &DescriptorChain,
    class: u8,
    command: u8,
) -> Result<[u8; N], CtrlError> {
    let len = u64::from(chain.readable_len()).saturating_sub(CTRL_HDR_LEN);
    let mut b = [0u8; N];
    if len != N as u64 || chain.read_at(CTRL_HDR_LEN as usize, &mut b) != N {
        return Err(CtrlError::DataLength {
            class,
            command,
            len,
            expected: N as u64,
        });
    }
    Ok(b)
}

/// Reads one `{le32 entries; u8 macs[entries][6]}` table at `*at` of a `total`-byte
/// request, keeping the first [`MAC_TABLE_ENTRIES`] addresses in `kept` (each checked to
/// be of the table's kind) and skipping the others unread; advances `*at` past the table.
/// Returns the entry count.
fn read_mac_table(
    chain: &DescriptorChain,
    at: &mut u64,
    total: u64,
    multicast: bool,
    kept: &mut [u64; MAC_TABLE_ENTRIES],
) -> Result<u32, CtrlError> {
    let table = if multicast { "multicast" } else { "unicast" };
    let truncated = |at: u64| CtrlError::MacTableTruncated {
        table,
        at,
        len: total,
    };
    let mut n = [0u8; 4];
    if *at + 4 > total || chain.read_at(*at as usize, &mut n) != 4 {
        return Err(truncated(*at));
    }
    let entries = u32::from_le_bytes(n);
    let start = *at + 4;
    let end = start + 6 * u64::from(entries);
    if end > total {
        return Err(truncated(start));
    }
    // Read the kept entries in blocks (fewer walks over the chain's segments).
    const BLOCK: usize = 16;
    let kept_n = (entries as usize).min(MAC_TABLE_ENTRIES);
    let mut buf = [0u8; 6 * BLOCK];
    let mut i = 0;
    while i < kept_n {
        let k = (kept_n - i).min(BLOCK);
        let off = start + 6 * i as u64;
        if chain.read_at(off as usize, &mut buf[..6 * k]) != 6 * k {
            return Err(truncated(off));
        }
        for (j, raw) in buf[..6 * k].chunks_exact(6).enumerate() {
            let mac: MacAddr = [raw[0], raw[1], raw[2], raw[3], raw[4], raw[5]];
            if is_multicast(&mac) != multicast {
                return Err(CtrlError::MacTableKind {
                    table,
                    index: (i + j) as u32,
                });
            }
            kept[i + j] = mac_to_u64(&mac);
        }
        i += k;
    }
    *at = end;
    Ok(entries)
}

impl QueueHandler for CtrlHandler {
    fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault> {
        if chain.writable_len() == 0 {
            guest_debug!(
                self.state.log,
                head = chain.head(),
                "Dropping virtio-net control request without a writable ack byte"
            );
            return Ok(0);
        }
        let ack = match self.execute(chain) {
            Ok(()) => VIRTIO_NET_OK,
            Err(e) => {
                guest_debug!(
                    self.state.log,
                    head = chain.head(),
                    error = %e,
                    "virtio-net control request failed"
                );
                VIRTIO_NET_ERR
            }
        };
        Ok(chain.write_at(0, &[ack]) as u32)
    }
}

#[cfg(test)]
mod tests {
    use uvdpa_virtio::Segment;

    use super::*;

    const CTRL_RX: VirtioFeatures = VirtioFeatures::VIRTIO_NET_F_CTRL_RX;
    const UNTOUCHED: u8 = 0xee;
    const MAC0: MacAddr = [0x02, 0, 0, 0, 0, 0x10];

    fn all_features() -> VirtioFeatures {
        VirtioFeatures::VIRTIO_NET_F_CTRL_VQ
            | VirtioFeatures::VIRTIO_NET_F_CTRL_RX
            | VirtioFeatures::VIRTIO_NET_F_CTRL_RX_EXTRA
            | VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR
            | VirtioFeatures::VIRTIO_NET_F_CTRL_VLAN
            | VirtioFeatures::VIRTIO_NET_F_GUEST_ANNOUNCE
            | VirtioFeatures::VIRTIO_NET_F_MQ
            | VirtioFeatures::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
            | VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM
            | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4
    }

    fn handler(features: VirtioFeatures) -> CtrlHandler {
        let config = NetConfig {
            mac: MAC0,
            mtu: 1500,
            max_queue_pairs: 4,
            link_up: true,
        };
        CtrlHandler::new(Arc::new(NetCtrlState::new(&config)), features, 4)
    }

    /// Runs one request split into `readable` pieces with `writable` bytes of answer
    /// space; returns (used length, the writable bytes).
    fn run_split(h: &mut CtrlHandler, readable: &[&[u8]], writable: usize) -> (u32, Vec<u8>) {
        let mut r: Vec<Vec<u8>> = readable.iter().map(|p| p.to_vec()).collect();
        let mut w = vec![UNTOUCHED; writable];
        let rs: Vec<Segment> = r
            .iter_mut()
            .map(|b| Segment {
                base: b.as_mut_ptr(),
                len: b.len(),
            })
            .collect();
        let ws = if writable == 0 {
            Vec::new()
        } else {
            vec![Segment {
                base: w.as_mut_ptr(),
                len: w.len(),
            }]
        };
        // SAFETY: the segments point into `r` and `w`, which outlive the chain.
        let chain = unsafe { DescriptorChain::from_segments(7, rs, ws) };
        let used = h.handle(&chain).expect("the control queue never faults");
        drop(chain);
        (used, w)
    }

    /// One request in one readable piece with one ack byte; returns the ack.
    fn run(h: &mut CtrlHandler, req: &[u8]) -> u8 {
        let (used, w) = run_split(h, &[req], 1);
        assert_eq!(used, 1);
        w[0]
    }

    fn table(macs: &[MacAddr]) -> Vec<u8> {
        let mut v = (macs.len() as u32).to_le_bytes().to_vec();
        for m in macs {
            v.extend_from_slice(m);
        }
        v
    }

    #[test]
    fn reset_state_matches_the_documentation() {
        let h = handler(all_features());
        let s = h.state();
        assert_eq!(s.mac(), MAC0);
        assert_eq!(s.max_queue_pairs(), 4);
        assert_eq!(s.active_queue_pairs(), 1);
        assert_eq!(
            s.rx_mode(),
            RxMode {
                promisc: true,
                ..RxMode::default()
            }
        );
        assert_eq!(s.mac_table(), MacTable::default());
        assert!(!s.vlan_allowed(0) && !s.vlan_allowed(4095) && !s.vlan_allowed(u16::MAX));
        assert!(!s.announce_pending());
        assert_eq!(s.status(true), VIRTIO_NET_S_LINK_UP);
        assert_eq!(s.status(false), 0);
        assert_eq!(
            s.guest_offloads(all_features()),
            VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4
        );
        // Promiscuous: everything passes.
        assert!(s.rx_filter_accepts(&[0x02, 9, 9, 9, 9, 9]));
    }

    #[test]
    fn rx_mode_commands_set_and_clear_each_mode() {
        let mut h = handler(all_features());
        let g0 = h.state().generation();
        for (cmd, get) in [
            (
                VIRTIO_NET_CTRL_RX_PROMISC,
                (|m: RxMode| m.promisc) as fn(RxMode) -> bool,
            ),
            (VIRTIO_NET_CTRL_RX_ALLMULTI, |m| m.allmulti),
            (VIRTIO_NET_CTRL_RX_ALLUNI, |m| m.alluni),
            (VIRTIO_NET_CTRL_RX_NOMULTI, |m| m.nomulti),
            (VIRTIO_NET_CTRL_RX_NOUNI, |m| m.nouni),
            (VIRTIO_NET_CTRL_RX_NOBCAST, |m| m.nobcast),
        ] {
            assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 1]), VIRTIO_NET_OK);
            assert!(get(h.state().rx_mode()), "command {cmd} on");
            assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 0]), VIRTIO_NET_OK);
            assert!(!get(h.state().rx_mode()), "command {cmd} off");
            // Neither 0 nor 1, missing or extra data: refused, nothing changes.
            let before = h.state().rx_mode();
            assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 2]), VIRTIO_NET_ERR);
            assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd]), VIRTIO_NET_ERR);
            assert_eq!(
                run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 1, 1]),
                VIRTIO_NET_ERR
            );
            assert_eq!(h.state().rx_mode(), before);
        }
        assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, 6, 1]), VIRTIO_NET_ERR);
        assert!(h.state().generation() >= g0 + 12);
    }

    #[test]
    fn rx_commands_need_their_features() {
        let mut h = handler(VirtioFeatures::VIRTIO_NET_F_CTRL_VQ);
        for cmd in 0..=5 {
            assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 1]), VIRTIO_NET_ERR);
        }
        let mut h = handler(CTRL_RX);
        assert_eq!(
            run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]),
            VIRTIO_NET_OK
        );
        assert_eq!(
            run(
                &mut h,
                &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, 1]
            ),
            VIRTIO_NET_OK
        );
        for cmd in 2..=5 {
            assert_eq!(
                run(&mut h, &[VIRTIO_NET_CTRL_RX, cmd, 1]),
                VIRTIO_NET_ERR,
                "{cmd}"
            );
        }
        assert_eq!(
            h.state().rx_mode(),
            RxMode {
                allmulti: true,
                ..RxMode::default()
            }
        );
    }

    #[test]
    fn mac_table_set_fills_the_filter() {
        let mut h = handler(all_features());
        let uni = [[0x02, 1, 1, 1, 1, 1], [0x02, 2, 2, 2, 2, 2]];
        let multi = [[0x01, 0, 0x5e, 0, 0, 0xfb]];
        let req = [
            &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET][..],
            &table(&uni),
            &table(&multi),
        ]
        .concat();
        assert_eq!(run(&mut h, &req), VIRTIO_NET_OK);
        let s = h.state().clone();
        assert_eq!(
            s.mac_table(),
            MacTable {
                unicast: uni.to_vec(),
                unicast_overflow: false,
                multicast: multi.to_vec(),
                multicast_overflow: false,
            }
        );
        // Promiscuous mode off: the filter decides.
        assert_eq!(
            run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]),
            VIRTIO_NET_OK
        );
        assert!(s.rx_filter_accepts(&MAC0));
        assert!(s.rx_filter_accepts(&uni[1]));
        assert!(!s.rx_filter_accepts(&[0x02, 3, 3, 3, 3, 3]));
        assert!(s.rx_filter_accepts(&multi[0]));
        assert!(!s.rx_filter_accepts(&[0x33, 0x33, 0, 0, 0, 1]));
        assert!(s.rx_filter_accepts(&[0xff; 6]));
        // ALLMULTI / NOMULTI / NOBCAST / ALLUNI / NOUNI.
        run(
            &mut h,
            &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, 1],
        );
        assert!(s.rx_filter_accepts(&[0x33, 0x33, 0, 0, 0, 1]));
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOMULTI, 1]);
        assert!(!s.rx_filter_accepts(&multi[0]));
        assert!(s.rx_filter_accepts(&[0xff; 6]), "NOMULTI spares broadcast");
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, 1]);
        assert!(!s.rx_filter_accepts(&[0xff; 6]));
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLUNI, 1]);
        assert!(s.rx_filter_accepts(&[0x02, 3, 3, 3, 3, 3]));
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOUNI, 1]);
        assert!(!s.rx_filter_accepts(&MAC0));
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 1]);
        assert!(s.rx_filter_accepts(&MAC0), "PROMISC overrides the others");

        // Empty tables are allowed; split across descriptors as Linux sends it.
        let (used, w) = run_split(
            &mut h,
            &[
                &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET],
                &table(&[]),
                &table(&multi)[..3],
                &table(&multi)[3..],
            ],
            1,
        );
        assert_eq!((used, w[0]), (1, VIRTIO_NET_OK));
        assert_eq!(s.mac_table().unicast, Vec::<MacAddr>::new());
        assert_eq!(s.mac_table().multicast, multi.to_vec());
    }

    #[test]
    fn mac_table_overflow_accepts_every_address_of_that_kind() {
        let mut h = handler(all_features());
        let uni: Vec<MacAddr> = (0..MAC_TABLE_ENTRIES as u32 + 5)
            .map(|i| {
                let b = i.to_be_bytes();
                [0x02, 0, b[0], b[1], b[2], b[3]]
            })
            .collect();
        let req = [
            &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET][..],
            &table(&uni),
            &table(&[]),
        ]
        .concat();
        assert_eq!(run(&mut h, &req), VIRTIO_NET_OK);
        let t = h.state().mac_table();
        assert!(t.unicast_overflow && !t.multicast_overflow);
        assert_eq!(t.unicast.len(), MAC_TABLE_ENTRIES);
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]);
        assert!(h.state().rx_filter_accepts(&[0x02, 7, 7, 7, 7, 7]));
        assert!(!h.state().rx_filter_accepts(&[0x01, 7, 7, 7, 7, 7]));
    }

    #[test]
    fn malformed_mac_tables_are_refused_and_change_nothing() {
        let mut h = handler(all_features());
        let good = [
            &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET][..],
            &table(&[[0x02, 1, 1, 1, 1, 1]]),
            &table(&[]),
        ]
        .concat();
        assert_eq!(run(&mut h, &good), VIRTIO_NET_OK);
        let before = h.state().mac_table();
        let hdr = [VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET];
        let cases: Vec<Vec<u8>> = vec![
            // No tables at all; only the first count; a count but too few entries.
            hdr.to_vec(),
            [&hdr[..], &table(&[])].concat(),
            [&hdr[..], &1u32.to_le_bytes(), &[0x02, 1, 1]].concat(),
            // Huge counts (no overflow in the bound check).
            [&hdr[..], &u32::MAX.to_le_bytes(), &table(&[])].concat(),
            [&hdr[..], &table(&[]), &u32::MAX.to_le_bytes()].concat(),
            // Trailing bytes.
            [&good[..], &[0]].concat(),
            // A multicast address in the unicast table, and the reverse.
            [&hdr[..], &table(&[[0x01, 0, 0x5e, 0, 0, 1]]), &table(&[])].concat(),
            [&hdr[..], &table(&[]), &table(&[[0x02, 0, 0, 0, 0, 1]])].concat(),
        ];
        for req in &cases {
            assert_eq!(run(&mut h, req), VIRTIO_NET_ERR, "{req:?}");
            assert_eq!(h.state().mac_table(), before);
        }
        // Without CTRL_RX the class is refused.
        let mut h = handler(VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR);
        assert_eq!(run(&mut h, &good), VIRTIO_NET_ERR);
    }

    #[test]
    fn mac_addr_set_changes_the_device_address() {
        let mut h = handler(all_features());
        let new = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let req = [
            &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET][..],
            &new,
        ]
        .concat();
        assert_eq!(run(&mut h, &req), VIRTIO_NET_OK);
        assert_eq!(h.state().mac(), new);
        for bad in [
            [&req[..7]].concat(),
            [&req[..], &[0]].concat(),
            [&req[..2], &[0x01, 0, 0x5e, 0, 0, 1]].concat(),
            [&req[..2], &[0; 6]].concat(),
        ] {
            assert_eq!(run(&mut h, &bad), VIRTIO_NET_ERR, "{bad:?}");
            assert_eq!(h.state().mac(), new);
        }
        let mut h = handler(CTRL_RX);
        assert_eq!(run(&mut h, &req), VIRTIO_NET_ERR);
        assert_eq!(h.state().mac(), MAC0);
        h.state().reset();
    }

    #[test]
    fn the_config_space_follows_mac_addr_set_and_announce() {
        let mut h = handler(all_features());
        let config = NetConfig {
            mac: MAC0,
            mtu: 1500,
            max_queue_pairs: 4,
            link_up: true,
        };
        assert_eq!(h.state().config_space(&config), config.config_space());
        let new = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let req = [
            &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET][..],
            &new,
        ]
        .concat();
        assert_eq!(run(&mut h, &req), VIRTIO_NET_OK);
        h.state().request_announce();
        let b = h.state().config_space(&config);
        assert_eq!(&b[..6], &new);
        assert_eq!(&b[6..8], &[3, 0], "LINK_UP | ANNOUNCE");
        assert_eq!(&b[8..], &config.config_space()[8..]);
    }

    #[test]
    fn vq_pairs_set_accepts_1_to_max() {
        let mut h = handler(all_features());
        let set = |v: u16| {
            [
                &[VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET][..],
                &v.to_le_bytes(),
            ]
            .concat()
        };
        assert_eq!(run(&mut h, &set(4)), VIRTIO_NET_OK);
        assert_eq!(h.state().active_queue_pairs(), 4);
        assert_eq!(run(&mut h, &set(1)), VIRTIO_NET_OK);
        assert_eq!(h.state().active_queue_pairs(), 1);
        for bad in [
            set(0),
            set(5),
            set(0x8000),
            set(u16::MAX),
            set(2)[..3].to_vec(),
            [&set(2)[..], &[0]].concat(),
        ] {
            assert_eq!(run(&mut h, &bad), VIRTIO_NET_ERR, "{bad:?}");
            assert_eq!(h.state().active_queue_pairs(), 1);
        }
        // RSS_CONFIG and HASH_CONFIG are not offered.
        assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_MQ, 1, 0, 0]), VIRTIO_NET_ERR);
        assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_MQ, 2, 0, 0]), VIRTIO_NET_ERR);
        let mut h = handler(all_features() - VirtioFeatures::VIRTIO_NET_F_MQ);
        assert_eq!(run(&mut h, &set(2)), VIRTIO_NET_ERR);
        assert_eq!(h.state().active_queue_pairs(), 1);
    }

    #[test]
    fn announce_ack_clears_the_status_bit() {
        let mut h = handler(all_features());
        h.state().request_announce();
        assert_eq!(
            h.state().status(true),
            VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
        );
        assert_eq!(
            run(&mut h, &[VIRTIO_NET_CTRL_ANNOUNCE, 0, 0]),
            VIRTIO_NET_ERR,
            "data"
        );
        assert!(h.state().announce_pending());
        assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_ANNOUNCE, 1]), VIRTIO_NET_ERR);
        assert_eq!(
            run(
                &mut h,
                &[VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK]
            ),
            VIRTIO_NET_OK
        );
        assert!(!h.state().announce_pending());
        assert_eq!(h.state().status(true), VIRTIO_NET_S_LINK_UP);
        let mut h = handler(CTRL_RX);
        assert_eq!(run(&mut h, &[VIRTIO_NET_CTRL_ANNOUNCE, 0]), VIRTIO_NET_ERR);
    }

    #[test]
    fn vlan_add_and_del_maintain_the_filter() {
        let mut h = handler(all_features());
        let cmd = |c: u8, vid: u16| [&[VIRTIO_NET_CTRL_VLAN, c][..], &vid.to_le_bytes()].concat();
        for vid in [0, 1, 63, 64, 100, 4095] {
            assert_eq!(
                run(&mut h, &cmd(VIRTIO_NET_CTRL_VLAN_ADD, vid)),
                VIRTIO_NET_OK
            );
            assert!(h.state().vlan_allowed(vid));
        }
        assert!(!h.state().vlan_allowed(2));
        assert_eq!(
            run(&mut h, &cmd(VIRTIO_NET_CTRL_VLAN_DEL, 64)),
            VIRTIO_NET_OK
        );
        assert!(!h.state().vlan_allowed(64) && h.state().vlan_allowed(63));
        for bad in [
            cmd(0, 4096),
            cmd(1, u16::MAX),
            cmd(2, 1),
            cmd(0, 1)[..3].to_vec(),
        ] {
            assert_eq!(run(&mut h, &bad), VIRTIO_NET_ERR, "{bad:?}");
        }
        let mut h = handler(CTRL_RX);
        assert_eq!(run(&mut h, &cmd(0, 1)), VIRTIO_NET_ERR);
        assert!(!h.state().vlan_allowed(1));
    }

    #[test]
    fn guest_offloads_set_accepts_only_negotiated_offloads() {
        let mut h = handler(all_features());
        let set = |v: u64| [&[VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0][..], &v.to_le_bytes()].concat();
        assert_eq!(run(&mut h, &set(0)), VIRTIO_NET_OK);
        assert_eq!(
            h.state().guest_offloads(all_features()),
            VirtioFeatures::empty()
        );
        let csum = VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM.bits();
        assert_eq!(run(&mut h, &set(csum)), VIRTIO_NET_OK);
        assert_eq!(
            h.state().guest_offloads(all_features()),
            VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM
        );
        // GUEST_TSO6 was not negotiated; bit 0 is not a guest offload.
        for bad in [VirtioFeatures::VIRTIO_NET_F_GUEST_TSO6.bits(), 1, u64::MAX] {
            assert_eq!(run(&mut h, &set(bad)), VIRTIO_NET_ERR);
        }
        assert_eq!(run(&mut h, &set(0)[..9]), VIRTIO_NET_ERR);
        assert_eq!(
            run(
                &mut h,
                &[VIRTIO_NET_CTRL_GUEST_OFFLOADS, 1, 0, 0, 0, 0, 0, 0, 0, 0]
            ),
            VIRTIO_NET_ERR
        );
        h.state().reset();
        assert_eq!(
            h.state().guest_offloads(all_features()),
            VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4
        );
        let mut h = handler(CTRL_RX | VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(run(&mut h, &set(csum)), VIRTIO_NET_ERR);
    }

    #[test]
    fn unknown_classes_commands_and_short_requests_get_err() {
        let mut h = handler(all_features());
        for req in [
            &[][..],
            &[VIRTIO_NET_CTRL_RX][..],
            &[6, 0][..],
            &[0xff, 0xff, 1, 2, 3][..],
            &[VIRTIO_NET_CTRL_MAC, 2, 0][..],
            &[VIRTIO_NET_CTRL_VLAN, 2, 0, 0][..],
        ] {
            assert_eq!(run(&mut h, req), VIRTIO_NET_ERR, "{req:?}");
        }
    }

    #[test]
    fn ack_goes_to_the_first_writable_byte() {
        let mut h = handler(all_features());
        let (used, w) = run_split(
            &mut h,
            &[&[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]],
            4,
        );
        assert_eq!(used, 1);
        assert_eq!(w, [VIRTIO_NET_OK, UNTOUCHED, UNTOUCHED, UNTOUCHED]);
        let (used, w) = run_split(&mut h, &[&[9, 9]], 2);
        assert_eq!(used, 1);
        assert_eq!(w, [VIRTIO_NET_ERR, UNTOUCHED]);
    }

    #[test]
    fn a_request_without_writable_byte_is_dropped() {
        let mut h = handler(all_features());
        let (used, _) = run_split(
            &mut h,
            &[&[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]],
            0,
        );
        assert_eq!(used, 0);
        assert!(h.state().rx_mode().promisc, "not executed");
        let (used, _) = run_split(&mut h, &[], 0);
        assert_eq!(used, 0);
    }

    #[test]
    fn reset_restores_every_value() {
        let mut h = handler(all_features());
        let reqs: Vec<Vec<u8>> = vec![
            vec![VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0],
            vec![VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, 1],
            [
                &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET][..],
                &[0x02, 5, 5, 5, 5, 5],
            ]
            .concat(),
            [
                &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET][..],
                &table(&[[0x02, 1, 1, 1, 1, 1]]),
                &table(&[[0x01, 1, 1, 1, 1, 1]]),
            ]
            .concat(),
            vec![VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 3, 0],
            vec![VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, 5, 0],
            [&[VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0][..], &[0; 8]].concat(),
        ];
        for r in &reqs {
            assert_eq!(run(&mut h, r), VIRTIO_NET_OK, "{r:?}");
        }
        h.state().request_announce();
        let fresh = handler(all_features());
        let (a, b) = (h.state(), fresh.state());
        assert_ne!(a.mac(), b.mac());
        a.reset();
        assert_eq!(a.mac(), b.mac());
        assert_eq!(a.active_queue_pairs(), b.active_queue_pairs());
        assert_eq!(a.rx_mode(), b.rx_mode());
        assert_eq!(a.mac_table(), b.mac_table());
        assert_eq!(a.vlan_allowed(5), b.vlan_allowed(5));
        assert_eq!(a.announce_pending(), b.announce_pending());
        assert_eq!(
            a.guest_offloads(all_features()),
            b.guest_offloads(all_features())
        );
    }

    #[test]
    fn readers_see_whole_tables_while_the_handler_rewrites_them() {
        let mut h = handler(all_features());
        let s = h.state().clone();
        run(&mut h, &[VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0]);
        // Two tables that differ in every entry; a torn read would mix them.
        let a: Vec<MacAddr> = (0..8u8).map(|i| [0x02, 0xa, 0, 0, 0, i]).collect();
        let b: Vec<MacAddr> = (0..8u8).map(|i| [0x02, 0xb, 0, 0, 0, i]).collect();
        let req = |t: &[MacAddr]| {
            [
                &[VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET][..],
                &table(t),
                &table(&[]),
            ]
            .concat()
        };
        let (ra, rb) = (req(&a), req(&b));
        assert_eq!(run(&mut h, &rb), VIRTIO_NET_OK);
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let (s, stop, a, b) = (s.clone(), stop.clone(), a.clone(), b.clone());
            let reads = reads.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = s.mac_table().unicast;
                    assert!(t == a || t == b, "torn table {t:?}");
                    assert!(!s.rx_filter_accepts(&[0x02, 0xc, 0, 0, 0, 3]));
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Rewrite until the reader has overlapped many rewrites (on a loaded machine it
        // may be scheduled late), bounded in time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut i = 0u64;
        while i < 2000 || reads.load(Ordering::Relaxed) < 1000 {
            assert!(std::time::Instant::now() < deadline, "the reader never ran");
            assert_eq!(
                run(&mut h, if i % 2 == 0 { &ra } else { &rb }),
                VIRTIO_NET_OK
            );
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
    }
}
