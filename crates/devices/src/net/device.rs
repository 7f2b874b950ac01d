//! The virtio-net device (virtio 1.2 §5.1): feature offer, config space, queue layout and
//! worker groups, over one of the backends of [`NetBackendSpec`].

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use uvdpa_virtio::worker::{ChainGroup, DeviceFault, GroupHandler, QueueHandler};
use uvdpa_virtio::{VirtioDevice, VirtioFeatures};

use super::capture::CapturePoint;
use super::config::{ctrl_queue_index, NetConfig, MIN_MTU};
use super::ctrl::{CtrlHandler, NetCtrlState};
use super::pair::{PairBackend, PairHandler};
use super::switch::{SwitchPort, SwitchRegistry};
use super::tap::Tap;

/// Virtio device ID of a network device (virtio 1.2 §5).
pub const VIRTIO_ID_NET: u32 = 1;

/// Largest queue size a net device accepts (descriptors).
pub const MAX_NET_QUEUE_SIZE: u16 = 32768;

/// Where a net device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// Frames transmitted on a queue pair come back on the same pair's receive queue, as
    /// the kernel's vdpa_sim_net does.
    Loopback,
    /// Transmitted frames are discarded (benchmarks: guest TX).
    Sink,
    /// The device sends `frame_len`-byte broadcast frames whenever the driver gives receive
    /// buffers (benchmarks: guest RX); 60..=MTU+14 bytes.
    Source {
        /// Frame length in bytes, Ethernet header included.
        frame_len: u16,
    },
    /// A Linux TAP interface, named as given or `uvdpa-NAME` (15 bytes at most).
    Tap {
        /// Interface name.
        ifname: Option<String>,
    },
    /// A port on the in-daemon L2 learning switch of this name.
    Switch {
        /// Switch name; net devices naming the same switch are joined.
        name: String,
    },
}

enum Backend {
    Loopback,
    Sink,
    Source(Vec<u8>),
    Tap(Arc<Tap>),
    Switch(Arc<SwitchPort>),
}

/// A virtio-net device.
pub struct NetDevice {
    config: NetConfig,
    /// The frontend's MTU (VHOST_USER_NET_SET_MTU), 0 when it set none: bounds transmitted
    /// frames instead of `config.mtu` while set.
    frontend_mtu: AtomicU16,
    queue_size: u16,
    backend: Backend,
    ctrl: Arc<NetCtrlState>,
    /// Where a live capture attaches (`uvdpa dev capture`); every queue pair's worker
    /// looks at it once per batch.
    capture: Arc<CapturePoint>,
}

/// Why a net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// An attribute is out of range.
    #[error("Invalid {field}: {reason}")]
    Invalid {
        /// The attribute.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The TAP interface could not be opened.
    #[error("Cannot open TAP interface {ifname}: {reason}")]
    Tap {
        /// Interface name.
        ifname: String,
        /// The error.
        reason: String,
    },
}

impl NetDevice {
    /// A device named `name` (used for the TAP name default) with `config`, queues of
    /// `queue_size` descriptors (1..=32768) and `backend`.
    ///
    /// # Errors
    /// [`NetDeviceError::Invalid`] for a queue size or source frame length out of range,
    /// [`NetDeviceError::Tap`] when the TAP interface cannot be created.
    pub fn new(
        name: &str,
        config: NetConfig,
        queue_size: u16,
        spec: &NetBackendSpec,
        switches: &SwitchRegistry,
    ) -> Result<Self, NetDeviceError> {
        if queue_size == 0 || queue_size > MAX_NET_QUEUE_SIZE {
            return Err(NetDeviceError::Invalid {
                field: "queue_size",
                reason: format!("{queue_size} (1..={MAX_NET_QUEUE_SIZE})"),
            });
        }
        let backend = match spec {
            NetBackendSpec::Loopback => Backend::Loopback,
            NetBackendSpec::Sink => Backend::Sink,
            NetBackendSpec::Source { frame_len } => {
                let max = usize::from(config.mtu) + 14;
                let len = usize::from(*frame_len);
                if !(60..=max).contains(&len) {
                    return Err(NetDeviceError::Invalid {
                        field: "frame_len",
                        reason: format!("{len} (60..={max} bytes for MTU {})", config.mtu),
                    });
                }
                Backend::Source(source_frame(&config.mac, len))
            }
            NetBackendSpec::Tap { ifname } => {
                // A given name may be an existing (persistent) TAP; the default name must
                // be new, so two devices whose names truncate alike never share one.
                let (ifname, tap) = match ifname {
                    Some(n) => (n.clone(), Tap::open(n, config.max_queue_pairs)),
                    None => {
                        let n = Tap::default_name(name);
                        let t = Tap::create(&n, config.max_queue_pairs);
                        (n, t)
                    }
                };
                let tap = tap.map_err(|e| NetDeviceError::Tap {
                    ifname,
                    reason: e.to_string(),
                })?;
                Backend::Tap(Arc::new(tap))
            }
            NetBackendSpec::Switch { name: sw } => {
                Backend::Switch(switches.join(sw).map_err(|e| NetDeviceError::Invalid {
                    field: "switch",
                    reason: format!("cannot join switch {sw}: {e}"),
                })?)
            }
        };
        let ctrl = Arc::new(NetCtrlState::new(&config));
        Ok(Self {
            config,
            frontend_mtu: AtomicU16::new(0),
            queue_size,
            backend,
            ctrl,
            capture: Arc::default(),
        })
    }

    /// Where a live capture of this device's frames attaches.
    pub fn capture_point(&self) -> &Arc<CapturePoint> {
        &self.capture
    }

    /// The device's configuration (MAC, MTU, queue pairs, link).
    pub fn net_config(&self) -> &NetConfig {
        &self.config
    }

    /// State the control virtqueue keeps (active queue pairs, receive modes, MAC).
    pub fn ctrl_state(&self) -> &Arc<NetCtrlState> {
        &self.ctrl
    }

    /// The TAP interface name, for a TAP backend.
    pub fn tap_name(&self) -> Option<&str> {
        match &self.backend {
            Backend::Tap(t) => Some(t.name()),
            _ => None,
        }
    }

    fn pairs(&self) -> u16 {
        self.config.max_queue_pairs
    }

    /// The control queue's index once `features` are negotiated (§5.1.2: 2·N with N the
    /// queue pairs under VIRTIO_NET_F_MQ, else 2).
    fn ctrl_index(&self, features: VirtioFeatures) -> u16 {
        ctrl_queue_index(self.pairs(), features)
    }
}

/// A broadcast frame of `len` bytes from `mac` with the local experimental EtherType
/// 0x88b5 and a zero payload.
fn source_frame(mac: &[u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> u16 {
        2 * self.pairs() + 1
    }

    fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn set_frontend_mtu(&self, mtu: Option<u16>) -> Result<(), DeviceFault> {
        match mtu {
            Some(m) if m < MIN_MTU => Err(DeviceFault(format!(
                "MTU {m} is below the minimum of {MIN_MTU} bytes"
            ))),
            m => {
                self.frontend_mtu.store(m.unwrap_or(0), Ordering::Release);
                Ok(())
            }
        }
    }

    fn features(&self) -> VirtioFeatures {
        let mut f = VirtioFeatures::VIRTIO_F_VERSION_1
            | VirtioFeatures::VIRTIO_RING_F_EVENT_IDX
            | VirtioFeatures::VIRTIO_RING_F_INDIRECT_DESC
            | VirtioFeatures::VIRTIO_F_RING_PACKED
            | VirtioFeatures::VIRTIO_F_IN_ORDER
            | VirtioFeatures::VIRTIO_NET_F_MAC
            | VirtioFeatures::VIRTIO_NET_F_MTU
            | VirtioFeatures::VIRTIO_NET_F_STATUS
            | VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF
            | VirtioFeatures::VIRTIO_NET_F_CTRL_VQ
            | VirtioFeatures::VIRTIO_NET_F_CTRL_RX
            | VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR;
        if self.pairs() > 1 {
            f |= VirtioFeatures::VIRTIO_NET_F_MQ;
        }
        // Checksum offload: the device completes a checksum the driver left to it when the
        // receiver cannot take it partial, so every backend can offer VIRTIO_NET_F_CSUM.
        // Segmentation (TSO) only where the backend does it: the TAP (the kernel).
        f |= VirtioFeatures::VIRTIO_NET_F_CSUM;
        match self.backend {
            Backend::Loopback => f |= VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM,
            Backend::Tap(_) => {
                f |= VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM
                    | VirtioFeatures::VIRTIO_NET_F_HOST_TSO4
                    | VirtioFeatures::VIRTIO_NET_F_HOST_TSO6
                    | VirtioFeatures::VIRTIO_NET_F_HOST_ECN
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO6
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_ECN;
            }
            _ => {}
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        // The MAC as the control queue last set it, and the link status.
        self.ctrl.config_space(&self.config)
    }

    fn queue_group(&self, index: u16, features: VirtioFeatures) -> u16 {
        if index < self.ctrl_index(features) {
            index & !1
        } else {
            index
        }
    }

    fn queue_handler(
        &self,
        index: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn QueueHandler>, DeviceFault> {
        if index == self.ctrl_index(features) {
            Ok(Box::new(CtrlHandler::new(
                self.ctrl.clone(),
                features,
                self.pairs(),
            )))
        } else {
            Err(DeviceFault(format!(
                "queue {index} is not the control queue ({})",
                self.ctrl_index(features)
            )))
        }
    }

    fn group_handler(
        &self,
        group: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn GroupHandler>, DeviceFault> {
        let ctrl = self.ctrl_index(features);
        if group == ctrl {
            return Ok(Box::new(ChainGroup::new(
                self.queue_handler(group, features)?,
            )));
        }
        if group >= ctrl || group % 2 != 0 {
            return Err(DeviceFault(format!("no queue group {group}")));
        }
        let pair = group / 2;
        let backend = match &self.backend {
            Backend::Loopback => PairBackend::Loopback,
            Backend::Sink => PairBackend::Sink,
            Backend::Source(f) => PairBackend::Source(f.clone()),
            Backend::Tap(t) => {
                t.set_offload(self.ctrl.guest_offloads(features))
                    .map_err(|e| DeviceFault(format!("TUNSETOFFLOAD failed: {e}")))?;
                PairBackend::Tap(t.clone(), pair)
            }
            // One switch port per device, on queue pair 0 only.
            Backend::Switch(p) if pair == 0 => PairBackend::Switch(p.clone()),
            Backend::Switch(_) => PairBackend::Sink,
        };
        let mtu = match self.frontend_mtu.load(Ordering::Acquire) {
            0 => self.config.mtu,
            m => m,
        };
        Ok(Box::new(
            PairHandler::new(backend, features, mtu).with_capture(self.capture.clone(), pair),
        ))
    }
}
