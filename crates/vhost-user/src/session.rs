//! One frontend's session with a device: feature and protocol negotiation, the memory table,
//! vrings, config space and device status (QEMU `docs/interop/vhost-user.rst`).
//!
//! Every request goes through the same steps: look up the code, check the protocol feature
//! it needs, check the attached fds, check the body size and decode it, act, reply. A
//! request the frontend asked an ack for (REPLY_ACK) gets `0` or a failure code; a failed
//! request without an ack, and any framing error, ends the session.
//!
//! Everything that is not vhost-user wire handling (status machine, features, vrings and
//! their workers, inflight, vectors, stats, resource entries) is the transport-neutral
//! [`DeviceRuntime`] this session drives: a vring is started by SET_VRING_KICK, stopped by
//! GET_VRING_BASE, enabled by SET_VRING_ENABLE, and runs once the memory table exists.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tracing::{debug, info, warn};
use uvdpa_runtime::{ConfigNotifier, DeviceRuntime, RuntimeParams};
pub use uvdpa_runtime::{ResCtx, SessionState};
use uvdpa_virtio::dirty::DirtyLog;
use uvdpa_virtio::inflight::{InflightLayout, InflightMap};
use uvdpa_virtio::interrupts::{IrqAction, VectorTable};
use uvdpa_virtio::loglimit::DeviceLogLimits;
use uvdpa_virtio::memory::MAX_REGIONS;
use uvdpa_virtio::split::MAX_QUEUE_SIZE;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{DeviceStatus, GuestMemory, MemoryRegion, VirtioDevice, VirtioFeatures};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserMsgValidator, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringAddrFlags,
    VhostUserVringState, VHOST_USER_CONFIG_SIZE,
};
use vm_memory::ByteValued;

use crate::connection::{Connection, Request};
use crate::error::Error;

pub use uvdpa_runtime::STOP_TIMEOUT;

/// Default of [`SessionParams::max_memory`] (attribute `max_memory`): 4 TiB of address
/// space. Regions are mapped from offset 0 of their fd, so a region costs
/// `mmap_offset + memory_size` bytes: a QEMU guest with one memory backend of N bytes maps
/// about N + 4 GiB (the region above 4 GiB starts that far into the fd), and two backends
/// of N/2 map N. The default serves any stock guest of up to 2 TiB, even with every
/// region in one fd, and bounds one device to 1/32 of the daemon's 128 TiB of user
/// address space, so no frontend can use it all up and make other devices' memory tables
/// fail.
pub const DEFAULT_MAX_MEMORY: u64 = 4 << 40;

/// Whether and how this backend does dirty page logging for live migration, from the
/// environment variable `UVDPA_DIRTY_LOG` read once per process:
/// - unset or `on`: VHOST_F_LOG_ALL and LOG_SHMFD are offered and every device write is
///   logged while the frontend asks for it;
/// - `off`: neither is offered (QEMU then refuses to migrate the VM: a migration blocker);
/// - `skip`: offered, but nothing is logged (a test switch that shows a migration test
///   catches lost writes; never for real use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Offered and done.
    On,
    /// Not offered.
    Off,
    /// Offered, not done (tests).
    Skip,
}

/// The process's [`DirtyLogMode`] (`UVDPA_DIRTY_LOG`).
pub fn dirty_log_mode() -> DirtyLogMode {
    static MODE: std::sync::OnceLock<DirtyLogMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("UVDPA_DIRTY_LOG").as_deref() {
        Ok("off") => DirtyLogMode::Off,
        Ok("skip") => {
            warn!("UVDPA_DIRTY_LOG=skip: dirty logging offered but not done; live migration will lose device writes");
            DirtyLogMode::Skip
        }
        Ok("on") | Err(_) => DirtyLogMode::On,
        Ok(other) => {
            warn!("UVDPA_DIRTY_LOG={other:?} is not on/off/skip; dirty logging stays on");
            DirtyLogMode::On
        }
    })
}

/// Transport features offered over vhost-user besides the device's own.
fn transport_features() -> VirtioFeatures {
    let log = if dirty_log_mode() == DirtyLogMode::Off {
        VirtioFeatures::empty()
    } else {
        VirtioFeatures::VHOST_F_LOG_ALL
    };
    VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES | log
}

/// Protocol features this backend implements (REPLY_ACK is always offered).
pub fn supported_protocol_features(device_type: u32) -> VhostUserProtocolFeatures {
    let log = if dirty_log_mode() == DirtyLogMode::Off {
        VhostUserProtocolFeatures::empty()
    } else {
        VhostUserProtocolFeatures::LOG_SHMFD
    };
    // VHOST_USER_PROTOCOL_F_NET_MTU (`MTU` in rust-vmm) for network devices (device ID 1).
    let net_mtu = if device_type == 1 {
        VhostUserProtocolFeatures::MTU
    } else {
        VhostUserProtocolFeatures::empty()
    };
    net_mtu
        | log
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// The backend→frontend channel (SET_BACKEND_REQ_FD), shared with workers so a failing
/// queue can tell the frontend at once.
type BackendChannel = Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>;

/// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no body, no reply asked) without blocking:
/// a frontend that does not read its channel loses the notice, it never stalls a worker.
fn notify_config_change(channel: &BackendChannel) -> bool {
    let guard = channel.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sock) = guard.as_ref() else {
        return false;
    };
    let code = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG as u32;
    let hdr = crate::connection::Header {
        request: code,
        flags: 0x1,
        size: 0,
    }
    .to_bytes();
    matches!(
        rustix::net::send(sock, &hdr, rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL),
        Ok(n) if n == hdr.len()
    )
}

/// A vhost-user session between one frontend and one device.
pub struct Session {
    pub(crate) name: String,
    conn: Connection,
    /// The device, its vrings and workers.
    pub(crate) rt: DeviceRuntime,
    pub(crate) protocol: VhostUserProtocolFeatures,
    /// SET_PROTOCOL_FEATURES was received: the frontend uses the protocol features
    /// (VHOST_USER_F_PROTOCOL_FEATURES is in effect even before SET_FEATURES acks it).
    pub(crate) protocol_negotiated: bool,
    /// ADD_MEM_REG repeats of a mapped region (same gpa, size and frontend address), by
    /// (gpa, size): each is a reference a later REM_MEM_REG drops before the region goes.
    /// At most one entry per mapped region.
    pub(crate) region_repeats: Vec<((u64, u64), u32)>,
    pub(crate) backend: BackendChannel,
    /// SET_LOG_FD's eventfd, kept (this backend logs synchronously and never signals it).
    log_fd: Option<OwnedFd>,
    /// What a new daemon needs to rebuild this session on live upgrade
    /// ([`crate::handover`]): the memory regions with their fds, and the requests whose
    /// effect lives outside the runtime.
    pub(crate) record: crate::handover::Record,
    frontend_pid: Option<u32>,
    /// See [`SessionParams::max_memory`].
    max_memory: u64,
    log_limits: Arc<DeviceLogLimits>,
}

fn decode<T: ByteValued + Default + VhostUserMsgValidator>(
    request: &'static str,
    body: &[u8],
) -> Result<T, Error> {
    let mut v = T::default();
    if body.len() != std::mem::size_of::<T>() {
        return Err(Error::BadBodySize {
            request,
            got: body.len(),
            expected: std::mem::size_of::<T>(),
        });
    }
    v.as_mut_slice().copy_from_slice(body);
    if !v.is_valid() {
        return Err(Error::InvalidParam {
            request,
            reason: "field values fail validation".into(),
        });
    }
    Ok(v)
}

fn expect_fds(request: &'static str, req: &Request, expected: usize) -> Result<(), Error> {
    if req.fds.len() != expected {
        return Err(Error::WrongFdCount {
            request,
            got: req.fds.len(),
            expected,
        });
    }
    Ok(())
}

fn u64_reply(v: u64) -> Vec<u8> {
    VhostUserU64::new(v).as_slice().to_vec()
}

/// What a session is given besides its connection.
pub struct SessionParams {
    /// The device served.
    pub device: Arc<dyn VirtioDevice>,
    /// One counters entry per device queue (kept across sessions).
    pub stats: Arc<StatsTable>,
    /// Refreshed after every request, for `dev show`.
    pub state: Arc<std::sync::Mutex<SessionState>>,
    /// Where to record resources, if anywhere.
    pub res: Option<ResCtx>,
    /// The frontend's pid (SO_PEERCRED), the owner of its resources.
    pub frontend_pid: Option<u32>,
    /// Busy-poll window of each queue worker (zero: off).
    pub poll: std::time::Duration,
    /// Features mandated at device creation beyond the device's own.
    pub mandated: VirtioFeatures,
    /// Device features withheld from the offer.
    pub unoffered: VirtioFeatures,
    /// The device's interrupt vectors: vector `i` is vring `i`'s call (seed 001).
    pub vectors: Arc<VectorTable>,
    /// Most bytes of address space the memory table may map, summed over its regions
    /// (each `mmap_offset + memory_size`, as regions are mapped from offset 0 of their
    /// fd). A SET_MEM_TABLE or ADD_MEM_REG past it is refused with
    /// [`Error::MemoryLimit`], before anything is mapped. Default [`DEFAULT_MAX_MEMORY`].
    pub max_memory: u64,
    /// The device's log limits, kept across sessions.
    pub log_limits: Arc<DeviceLogLimits>,
}

impl Session {
    /// A fresh session on an accepted connection. `name` names the device in logs and
    /// worker threads.
    pub fn new(name: &str, conn: Connection, p: SessionParams) -> Self {
        let SessionParams {
            device,
            stats,
            state,
            res,
            frontend_pid,
            poll,
            mandated,
            unoffered,
            vectors,
            max_memory,
            log_limits,
        } = p;
        let backend = BackendChannel::default();
        let channel = backend.clone();
        // A duplicate of the socket, so a queue worker can end the session (shutdown wakes
        // the session's read with end-of-file) when the frontend's memory faulted.
        let end_session = conn.as_fd().try_clone_to_owned().ok().map(|sock| {
            Arc::new(move || {
                let _ = rustix::net::shutdown(&sock, rustix::net::Shutdown::Both);
            }) as uvdpa_runtime::SessionEnder
        });
        // Offer and mandate as the device says; vhost-user frontends proxy the status of
        // their own driver and may write FEATURES_OK/DRIVER_OK alone (QEMU 7.2 does).
        let rt = DeviceRuntime::new(
            name,
            RuntimeParams {
                device,
                stats,
                state,
                res,
                frontend_pid,
                poll,
                mandated,
                unoffered,
                transport_features: transport_features(),
                strict_status_order: false,
                addrs_are_uaddr: true,
                vectors,
                notify_config: Arc::new(move || notify_config_change(&channel)),
                end_session,
                log_limits: log_limits.clone(),
            },
        );
        Self {
            name: name.to_string(),
            conn,
            rt,
            protocol: VhostUserProtocolFeatures::empty(),
            protocol_negotiated: false,
            region_repeats: Vec::new(),
            backend,
            log_fd: None,
            record: crate::handover::Record::default(),
            frontend_pid,
            max_memory,
            log_limits,
        }
    }

    pub(crate) fn publish_state(&self) {
        let protocol = self.protocol.bits();
        self.rt.publish_state(|st| st.protocol_features = protocol);
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to this session's frontend over the
    /// backend channel (SET_BACKEND_REQ_FD) when called; the call returns whether the
    /// notice went out (false before the frontend set a channel, or when it does not read
    /// it). It never blocks, and stays valid (a no-op) after the session ended.
    pub fn config_notifier(&self) -> ConfigNotifier {
        let channel = self.backend.clone();
        Arc::new(move || notify_config_change(&channel))
    }

    /// The frontend's pid, as given at creation.
    pub fn frontend_pid(&self) -> Option<u32> {
        self.frontend_pid
    }

    /// The connection (to poll it).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The device status as GET_STATUS reports it.
    pub fn device_status(&self) -> DeviceStatus {
        self.rt.device_status()
    }

    /// Reads and handles one request.
    ///
    /// # Errors
    /// An error for which [`Error::ends_session`] is true, or any failure of a request that
    /// could not be answered with a failure reply; the caller closes the session.
    pub fn handle_one(&mut self) -> Result<(), Error> {
        let req = self.conn.recv_request()?;
        let code = req
            .hdr
            .code()
            .ok_or(Error::UnknownRequest(req.hdr.request))?;
        if code == FrontendReq::GET_INFLIGHT_FD {
            // The one reply that carries an fd.
            return match self.get_inflight_fd(&req) {
                Ok(map) => {
                    let body = VhostUserInflight::new(
                        map.len() as u64,
                        0,
                        map.num_queues(),
                        map.queue_size(),
                    );
                    self.conn
                        .send_reply_with_fds(&req.hdr, body.as_slice(), &[map.fd()])
                }
                Err(e) if e.ends_session() => Err(e),
                Err(e) => {
                    // A reply without a buffer (mmap_size 0, no fd): QEMU then runs the
                    // device without inflight tracking instead of failing to start it.
                    if let Some(suppressed) = self.log_limits.request.check() {
                        warn!(device = %self.name, suppressed, "GET_INFLIGHT_FD refused, no inflight buffer: {e}");
                    }
                    let body = VhostUserInflight::new(0, 0, 0, 0);
                    self.conn.send_reply(&req.hdr, body.as_slice())
                }
            };
        }
        let result = self.dispatch(code, &req);
        self.publish_state();
        // Evaluated after the request, so SET_PROTOCOL_FEATURES enabling REPLY_ACK with
        // NEED_REPLY is acked, as the rust-vmm backend does.
        let wants_ack =
            req.hdr.need_reply() && self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        match result {
            Ok(Some(reply)) => self.conn.send_reply(&req.hdr, &reply),
            Ok(None) if wants_ack => self.conn.send_reply(&req.hdr, &u64_reply(0)),
            Ok(None) => Ok(()),
            Err(e) if e.ends_session() => Err(e),
            Err(e) if wants_ack && !has_reply(code) => {
                if let Some(suppressed) = self.log_limits.request.check() {
                    warn!(device = %self.name, request = ?code, suppressed, "Request failed: {e}");
                }
                self.conn.send_reply(&req.hdr, &u64_reply(1))
            }
            Err(e) => Err(e),
        }
    }

    fn need(
        &self,
        request: &'static str,
        f: VhostUserProtocolFeatures,
        name: &'static str,
    ) -> Result<(), Error> {
        if self.protocol.contains(f) {
            Ok(())
        } else {
            Err(Error::FeatureNotNegotiated {
                request,
                feature: name,
            })
        }
    }

    fn vring_index(&self, index: u32) -> Result<usize, Error> {
        let i = index as usize;
        if i < self.rt.num_vrings() {
            Ok(i)
        } else {
            Err(Error::VringIndex {
                index,
                num: self.rt.device().num_queues(),
            })
        }
    }

    /// Handles one decoded request; `Ok(Some(body))` is a reply to send.
    pub(crate) fn dispatch(
        &mut self,
        code: FrontendReq,
        req: &Request,
    ) -> Result<Option<Vec<u8>>, Error> {
        use FrontendReq as R;
        debug!(device = %self.name, request = ?code, size = req.body.len(), fds = req.fds.len(), "vhost-user request");
        let no_body = |name: &'static str| -> Result<(), Error> {
            expect_fds(name, req, 0)?;
            if !req.body.is_empty() {
                return Err(Error::BadBodySize {
                    request: name,
                    got: req.body.len(),
                    expected: 0,
                });
            }
            Ok(())
        };
        match code {
            R::GET_FEATURES => {
                no_body("GET_FEATURES")?;
                Ok(Some(u64_reply(self.offered().bits())))
            }
            R::SET_FEATURES => {
                expect_fds("SET_FEATURES", req, 0)?;
                let v: VhostUserU64 = decode("SET_FEATURES", &req.body)?;
                self.set_features(v.value)?;
                Ok(None)
            }
            R::SET_OWNER => {
                no_body("SET_OWNER")?;
                Ok(None)
            }
            R::RESET_OWNER => {
                no_body("RESET_OWNER")?;
                self.reset();
                Ok(None)
            }
            R::GET_PROTOCOL_FEATURES => {
                no_body("GET_PROTOCOL_FEATURES")?;
                Ok(Some(u64_reply(
                    supported_protocol_features(self.rt.device().device_type()).bits(),
                )))
            }
            R::SET_PROTOCOL_FEATURES => {
                expect_fds("SET_PROTOCOL_FEATURES", req, 0)?;
                let v: VhostUserU64 = decode("SET_PROTOCOL_FEATURES", &req.body)?;
                let unknown =
                    v.value & !supported_protocol_features(self.rt.device().device_type()).bits();
                if unknown != 0 {
                    return Err(Error::InvalidParam {
                        request: "SET_PROTOCOL_FEATURES",
                        reason: format!("unsupported protocol features {unknown:#x}"),
                    });
                }
                self.protocol = VhostUserProtocolFeatures::from_bits_truncate(v.value);
                self.protocol_negotiated = true;
                Ok(None)
            }
            R::GET_QUEUE_NUM => {
                self.need("GET_QUEUE_NUM", VhostUserProtocolFeatures::MQ, "MQ")?;
                no_body("GET_QUEUE_NUM")?;
                Ok(Some(u64_reply(u64::from(self.rt.device().num_queues()))))
            }
            R::SET_MEM_TABLE => {
                self.set_mem_table(req)?;
                Ok(None)
            }
            R::GET_MAX_MEM_SLOTS => {
                self.need(
                    "GET_MAX_MEM_SLOTS",
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                no_body("GET_MAX_MEM_SLOTS")?;
                Ok(Some(u64_reply(MAX_REGIONS as u64)))
            }
            R::ADD_MEM_REG => {
                self.need(
                    "ADD_MEM_REG",
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                expect_fds("ADD_MEM_REG", req, 1)?;
                let r: VhostUserSingleMemoryRegion = decode("ADD_MEM_REG", &req.body)?;
                self.add_mem_region(&r, &req.fds)?;
                Ok(None)
            }
            R::REM_MEM_REG => {
                self.need(
                    "REM_MEM_REG",
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                // QEMU attaches the region's fd; it is not needed and is closed on drop.
                if req.fds.len() > 1 {
                    return Err(Error::WrongFdCount {
                        request: "REM_MEM_REG",
                        got: req.fds.len(),
                        expected: 1,
                    });
                }
                let r: VhostUserSingleMemoryRegion = decode("REM_MEM_REG", &req.body)?;
                self.remove_mem_region(r.guest_phys_addr, r.memory_size)?;
                Ok(None)
            }
            R::SET_VRING_NUM => {
                expect_fds("SET_VRING_NUM", req, 0)?;
                let s: VhostUserVringState = decode("SET_VRING_NUM", &req.body)?;
                let i = self.vring_index(s.index)?;
                // The frontend chooses the ring size, whatever the device's queue_size:
                // packed rings any size up to 32768 (virtio 1.2 §2.8), split rings a power
                // of two up to 32768 (§2.7).
                let max = MAX_QUEUE_SIZE;
                let num = s.num;
                let packed = self
                    .rt
                    .acked()
                    .contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
                if num == 0 || (!packed && !num.is_power_of_two()) || num > u32::from(max) {
                    return Err(Error::InvalidParam {
                        request: "SET_VRING_NUM",
                        reason: format!("size {num} (1..={max}, a power of two for split rings)"),
                    });
                }
                self.rt.reconfigure(i, |v| v.size = num as u16)?;
                Ok(None)
            }
            R::SET_VRING_ADDR => {
                expect_fds("SET_VRING_ADDR", req, 0)?;
                let a: VhostUserVringAddr = decode("SET_VRING_ADDR", &req.body)?;
                let i = self.vring_index(a.index)?;
                let log = match VhostUserVringAddrFlags::from_bits(a.flags) {
                    Some(f) if f.is_empty() => None,
                    Some(f)
                        if f.bits() == VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
                            && dirty_log_mode() != DirtyLogMode::Off =>
                    {
                        Some(a.log)
                    }
                    _ => {
                        return Err(Error::InvalidParam {
                            request: "SET_VRING_ADDR",
                            reason: format!("flags {:#x} (only VHOST_VRING_F_LOG)", { a.flags }),
                        })
                    }
                };
                let addrs = (a.descriptor, a.available, a.used);
                self.rt.reconfigure(i, |v| {
                    v.addr = Some(addrs);
                    v.log_addr = log;
                })?;
                Ok(None)
            }
            R::SET_VRING_BASE => {
                expect_fds("SET_VRING_BASE", req, 0)?;
                let s: VhostUserVringState = decode("SET_VRING_BASE", &req.body)?;
                let i = self.vring_index(s.index)?;
                // Split: the next avail index. Packed: bits 0..14 the next avail slot, bit
                // 15 its wrap counter; some frontends add the used index and wrap counter in
                // bits 16..31, which this device does not need (it completes in order, so
                // they equal the avail ones) and ignores.
                let packed = self
                    .rt
                    .acked()
                    .contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
                let base = match u16::try_from(s.num) {
                    Ok(b) => b,
                    Err(_) if packed => s.num as u16,
                    Err(_) => {
                        return Err(Error::InvalidParam {
                            request: "SET_VRING_BASE",
                            reason: format!("base {} does not fit 16 bits", { s.num }),
                        })
                    }
                };
                debug!(
                    device = %self.name,
                    vring = i,
                    num = format_args!("{:#x}", { s.num }),
                    "SET_VRING_BASE"
                );
                self.rt.reconfigure(i, |v| {
                    v.base = base;
                    v.base_set = true;
                })?;
                Ok(None)
            }
            R::GET_VRING_BASE => {
                expect_fds("GET_VRING_BASE", req, 0)?;
                let s: VhostUserVringState = decode("GET_VRING_BASE", &req.body)?;
                let i = self.vring_index(s.index)?;
                // The ring stops; the other vrings of its group keep running.
                self.rt.reconfigure(i, |v| {
                    v.started = false;
                    v.kick = None;
                })?;
                let packed = self
                    .rt
                    .acked()
                    .contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
                let (base, base_set) = self
                    .rt
                    .vring(i)
                    .map_or((0, false), |v| (v.base, v.base_set));
                // Packed: the used slot and its wrap counter go in bits 16..31; the device
                // completes in order, so they equal the avail ones.
                let num = if packed {
                    let base = if base_set { base } else { 0x8000 };
                    u32::from(base) | u32::from(base) << 16
                } else {
                    u32::from(base)
                };
                debug!(
                    device = %self.name,
                    vring = i,
                    num = format_args!("{num:#x}"),
                    "GET_VRING_BASE reply"
                );
                let reply = VhostUserVringState::new(s.index, num);
                Ok(Some(reply.as_slice().to_vec()))
            }
            R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => {
                self.set_vring_fd(code, req)?;
                Ok(None)
            }
            R::SET_VRING_ENABLE => {
                expect_fds("SET_VRING_ENABLE", req, 0)?;
                // QEMU's vhost-user-net enables its rings before SET_FEATURES: protocol
                // features are in effect once they were negotiated with
                // SET_PROTOCOL_FEATURES (or acked in SET_FEATURES).
                if !self.protocol_negotiated
                    && !self
                        .rt
                        .acked()
                        .contains(VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES)
                {
                    return Err(Error::InvalidParam {
                        request: "SET_VRING_ENABLE",
                        reason: "VHOST_USER_F_PROTOCOL_FEATURES not negotiated".into(),
                    });
                }
                let s: VhostUserVringState = decode("SET_VRING_ENABLE", &req.body)?;
                let i = self.vring_index(s.index)?;
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    n => {
                        return Err(Error::InvalidParam {
                            request: "SET_VRING_ENABLE",
                            reason: format!("value {n} (0 or 1)"),
                        })
                    }
                };
                self.rt.reconfigure(i, |v| v.enabled = enable)?;
                Ok(None)
            }
            R::GET_CONFIG => {
                self.need("GET_CONFIG", VhostUserProtocolFeatures::CONFIG, "CONFIG")?;
                expect_fds("GET_CONFIG", req, 0)?;
                Ok(Some(self.get_config(&req.body)?))
            }
            R::SET_CONFIG => {
                self.need("SET_CONFIG", VhostUserProtocolFeatures::CONFIG, "CONFIG")?;
                expect_fds("SET_CONFIG", req, 0)?;
                let hdr_len = std::mem::size_of::<VhostUserConfig>();
                let (head, payload) = req.body.split_at(hdr_len.min(req.body.len()));
                let c: VhostUserConfig = decode("SET_CONFIG", head)?;
                if payload.len() != c.size as usize {
                    return Err(Error::BadBodySize {
                        request: "SET_CONFIG",
                        got: req.body.len(),
                        expected: hdr_len + c.size as usize,
                    });
                }
                self.rt
                    .device()
                    .write_config(c.offset, payload)
                    .map_err(|e| Error::Device(e.0))?;
                self.record.config_written(&req.body, c.offset, c.size);
                Ok(None)
            }
            R::SET_BACKEND_REQ_FD => {
                self.need(
                    "SET_BACKEND_REQ_FD",
                    VhostUserProtocolFeatures::BACKEND_REQ,
                    "BACKEND_REQ",
                )?;
                expect_fds("SET_BACKEND_REQ_FD", req, 1)?;
                if !req.body.is_empty() {
                    return Err(Error::BadBodySize {
                        request: "SET_BACKEND_REQ_FD",
                        got: req.body.len(),
                        expected: 0,
                    });
                }
                let fd = req.fds.first().and_then(|f| f.try_clone().ok()).ok_or(
                    Error::WrongFdCount {
                        request: "SET_BACKEND_REQ_FD",
                        got: 0,
                        expected: 1,
                    },
                )?;
                let sock = std::os::unix::net::UnixStream::from(fd);
                *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock);
                Ok(None)
            }
            R::SET_INFLIGHT_FD => {
                self.need(
                    "SET_INFLIGHT_FD",
                    VhostUserProtocolFeatures::INFLIGHT_SHMFD,
                    "INFLIGHT_SHMFD",
                )?;
                expect_fds("SET_INFLIGHT_FD", req, 1)?;
                let m: VhostUserInflight = decode("SET_INFLIGHT_FD", &req.body)?;
                self.check_inflight_geometry("SET_INFLIGHT_FD", &m)?;
                let fd = req.fds.first().and_then(|f| f.try_clone().ok()).ok_or(
                    Error::WrongFdCount {
                        request: "SET_INFLIGHT_FD",
                        got: 0,
                        expected: 1,
                    },
                )?;
                let map =
                    InflightMap::open(fd, m.mmap_offset, m.mmap_size, m.num_queues, m.queue_size)
                        .map_err(|e| Error::InvalidParam {
                        request: "SET_INFLIGHT_FD",
                        reason: e.to_string(),
                    })?;
                self.rt.set_inflight(Some(map))?;
                self.record.inflight = Some(req.body.clone());
                Ok(None)
            }
            R::SET_LOG_BASE => {
                self.need(
                    "SET_LOG_BASE",
                    VhostUserProtocolFeatures::LOG_SHMFD,
                    "LOG_SHMFD",
                )?;
                expect_fds("SET_LOG_BASE", req, 1)?;
                let m: VhostUserLog = decode("SET_LOG_BASE", &req.body)?;
                let fd = req.fds.first().ok_or(Error::WrongFdCount {
                    request: "SET_LOG_BASE",
                    got: 0,
                    expected: 1,
                })?;
                let log = DirtyLog::map(fd, m.mmap_size, m.mmap_offset).map_err(|e| {
                    Error::InvalidParam {
                        request: "SET_LOG_BASE",
                        reason: e.to_string(),
                    }
                })?;
                if let Some(suppressed) = self.log_limits.request.check() {
                    info!(device = %self.name, bytes = log.len(), suppressed, "dirty log set");
                }
                if dirty_log_mode() == DirtyLogMode::On {
                    self.rt.set_dirty_log(Some(Arc::new(log)))?;
                }
                // With LOG_SHMFD the frontend waits for a reply once the log is mapped
                // (QEMU checks only the request code; rust-vmm reads a VhostUserLog).
                Ok(Some(m.as_slice().to_vec()))
            }
            R::SET_LOG_FD => {
                self.need(
                    "SET_LOG_FD",
                    VhostUserProtocolFeatures::LOG_SHMFD,
                    "LOG_SHMFD",
                )?;
                expect_fds("SET_LOG_FD", req, 1)?;
                self.log_fd = req.fds.first().and_then(|f| f.try_clone().ok());
                Ok(None)
            }
            R::SET_STATUS => {
                self.need("SET_STATUS", VhostUserProtocolFeatures::STATUS, "STATUS")?;
                expect_fds("SET_STATUS", req, 0)?;
                let v: VhostUserU64 = decode("SET_STATUS", &req.body)?;
                let value = u8::try_from(v.value).map_err(|_| Error::InvalidParam {
                    request: "SET_STATUS",
                    reason: format!("status {:#x} does not fit 8 bits", { v.value }),
                })?;
                self.rt.set_status(value)?;
                Ok(None)
            }
            R::GET_STATUS => {
                self.need("GET_STATUS", VhostUserProtocolFeatures::STATUS, "STATUS")?;
                no_body("GET_STATUS")?;
                Ok(Some(u64_reply(u64::from(self.device_status().bits()))))
            }
            R::NET_SET_MTU => {
                self.need("NET_SET_MTU", VhostUserProtocolFeatures::MTU, "MTU")?;
                expect_fds("NET_SET_MTU", req, 0)?;
                let v: VhostUserU64 = decode("NET_SET_MTU", &req.body)?;
                let mtu = u16::try_from(v.value).map_err(|_| Error::InvalidParam {
                    request: "NET_SET_MTU",
                    reason: format!("MTU {} does not fit 16 bits", { v.value }),
                })?;
                self.rt
                    .device()
                    .set_frontend_mtu(Some(mtu))
                    .map_err(|e| Error::InvalidParam {
                        request: "NET_SET_MTU",
                        reason: e.0,
                    })?;
                if let Some(suppressed) = self.log_limits.request.check() {
                    info!(device = %self.name, mtu, suppressed, "frontend MTU set");
                }
                self.record.mtu = Some(mtu);
                Ok(None)
            }
            R::RESET_DEVICE => {
                self.need(
                    "RESET_DEVICE",
                    VhostUserProtocolFeatures::RESET_DEVICE,
                    "RESET_DEVICE",
                )?;
                no_body("RESET_DEVICE")?;
                self.reset();
                Ok(None)
            }
            other => {
                if let Some(suppressed) = self.log_limits.request.check() {
                    warn!(device = %self.name, request = ?other, suppressed, "Unsupported vhost-user request");
                }
                Err(Error::UnknownRequest(other as u32))
            }
        }
    }

    fn check_inflight_geometry(
        &self,
        request: &'static str,
        m: &VhostUserInflight,
    ) -> Result<(), Error> {
        let (nq, qs) = (m.num_queues, m.queue_size);
        // Any ring size a frontend may set (see SET_VRING_NUM), whatever the device's
        // queue_size: the region is at most 64 queues of 32768 descriptors.
        if nq == 0 || nq > self.rt.device().num_queues() || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(Error::InvalidParam {
                request,
                reason: format!(
                    "{nq} queues of {qs} (device: 1..={} queues of 1..={MAX_QUEUE_SIZE})",
                    self.rt.device().num_queues(),
                ),
            });
        }
        Ok(())
    }

    fn get_inflight_fd(&mut self, req: &Request) -> Result<Arc<InflightMap>, Error> {
        self.need(
            "GET_INFLIGHT_FD",
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            "INFLIGHT_SHMFD",
        )?;
        expect_fds("GET_INFLIGHT_FD", req, 0)?;
        let m: VhostUserInflight = decode("GET_INFLIGHT_FD", &req.body)?;
        self.check_inflight_geometry("GET_INFLIGHT_FD", &m)?;
        // The region follows the ring layout the features negotiated: QEMU sends
        // SET_FEATURES first (vhost_dev_prepare_inflight). A frontend asking before
        // SET_FEATURES gets the packed size, the larger, which serves either layout.
        let acked = self.rt.acked();
        let layout = if acked.is_empty() || acked.contains(VirtioFeatures::VIRTIO_F_RING_PACKED) {
            InflightLayout::Packed
        } else {
            InflightLayout::Split
        };
        let map = InflightMap::create_in(layout, m.num_queues, m.queue_size)
            .map_err(|e| Error::Device(e.to_string()))?;
        self.rt.set_inflight(Some(map.clone()))?;
        Ok(map)
    }

    /// Features offered over vhost-user: the device's, with VHOST_USER_F_PROTOCOL_FEATURES.
    fn offered(&self) -> VirtioFeatures {
        self.rt.offered()
    }

    fn set_features(&mut self, value: u64) -> Result<(), Error> {
        let unknown = value & !self.offered().bits();
        if unknown != 0 {
            return Err(Error::UnofferedFeatures { unknown });
        }
        let features = VirtioFeatures::from_raw(value);
        let transport =
            VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES | VirtioFeatures::VHOST_F_LOG_ALL;
        let logging = features.contains(VirtioFeatures::VHOST_F_LOG_ALL);
        if logging != self.rt.acked().contains(VirtioFeatures::VHOST_F_LOG_ALL)
            && self.log_limits.request.check().is_some()
        {
            info!(device = %self.name, on = logging, "dirty logging (VHOST_F_LOG_ALL) switched");
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::STATUS) {
            // Without SET_STATUS, SET_FEATURES is where FEATURES_OK is decided.
            self.rt.check_features(features - transport)?;
        }
        self.rt.set_features(features, transport)?;
        if !features.contains(VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES) {
            // Without protocol features, rings are enabled as soon as they start.
            for i in 0..self.rt.num_vrings() {
                self.rt.reconfigure(i, |v| v.enabled = true)?;
            }
        }
        debug!(device = %self.name, features = format_args!("{value:#x}"), "features acked");
        Ok(())
    }

    /// Device reset by status (SET_STATUS 0, virtio 1.2 §2.1); see
    /// [`DeviceRuntime::reset_status`]. QEMU 7.2 sends it before GET_VRING_BASE when it
    /// stops a device, so the vrings keep the base they stopped at. Session-level
    /// negotiation (virtio and protocol features) is kept.
    pub fn reset_status(&mut self) {
        self.rt.reset_status();
    }

    /// Full device reset (RESET_DEVICE, RESET_OWNER); see [`DeviceRuntime::reset`].
    pub fn reset(&mut self) {
        self.rt.reset();
        self.record.inflight = None;
    }

    /// Says in the log when a memory region's fd is not sealed against shrinking
    /// (`F_SEAL_SHRINK`): the frontend could truncate it under the mapping, and only the
    /// SIGBUS containment of [`uvdpa_virtio::fault`] keeps the daemon alive then. Files
    /// and hugetlbfs (QEMU's memory-backend-file, DPDK's hugepage files) cannot be sealed,
    /// so this is no refusal, and it is logged at INFO (default level) rather than WARN:
    /// common frontends (libblkio, virtio-driver, DPDK) hand over unsealed fds every time.
    fn check_seals(&self, fd: &OwnedFd, gpa: u64, size: u64) {
        let seals = uvdpa_virtio::fd_seals(fd);
        if !seals.shrink_sealed {
            if let Some(suppressed) = self.log_limits.request.check() {
                info!(
                    device = %self.name,
                    gpa = format_args!("{gpa:#x}"),
                    size = format_args!("{size:#x}"),
                    fd = seals.kind,
                    suppressed,
                    "Memory region is not sealed against shrinking (no F_SEAL_SHRINK): relies on SIGBUS containment"
                );
            }
        }
    }

    /// Refuses a memory table that would map `total` bytes (`None`: more than 2^64) when
    /// that is past [`SessionParams::max_memory`]; returns the total otherwise.
    fn check_memory_limit(&self, total: Option<u64>) -> Result<u64, Error> {
        match total {
            Some(t) if t <= self.max_memory => Ok(t),
            _ => Err(Error::MemoryLimit {
                total: total.unwrap_or(u64::MAX),
                limit: self.max_memory,
            }),
        }
    }

    fn set_mem_table(&mut self, req: &Request) -> Result<(), Error> {
        let hdr_len = std::mem::size_of::<VhostUserMemory>();
        let region_len = std::mem::size_of::<VhostUserMemoryRegion>();
        let (head, rest) = req.body.split_at(hdr_len.min(req.body.len()));
        let m: VhostUserMemory = decode("SET_MEM_TABLE", head)?;
        let n = m.num_regions as usize;
        if n == 0 || n > crate::connection::MAX_FDS {
            return Err(Error::InvalidParam {
                request: "SET_MEM_TABLE",
                reason: format!("{n} regions (1..={})", crate::connection::MAX_FDS),
            });
        }
        if rest.len() != n * region_len {
            return Err(Error::BadBodySize {
                request: "SET_MEM_TABLE",
                got: req.body.len(),
                expected: hdr_len + n * region_len,
            });
        }
        expect_fds("SET_MEM_TABLE", req, n)?;
        // The whole table against the limit before anything is mapped; it replaces the
        // current table, so only its own regions count.
        let mut wanted = Vec::with_capacity(n);
        for chunk in rest.chunks_exact(region_len) {
            wanted.push(decode::<VhostUserMemoryRegion>("SET_MEM_TABLE", chunk)?);
        }
        let total = self.check_memory_limit(wanted.iter().try_fold(0u64, |sum, r| {
            sum.checked_add(mapped_bytes(r.mmap_offset, r.memory_size))
        }))?;
        let mut regions = Vec::with_capacity(n);
        let mut records = Vec::with_capacity(n);
        for (r, fd) in wanted.iter().zip(&req.fds) {
            self.check_seals(fd, r.guest_phys_addr, r.memory_size);
            regions.push(MemoryRegion::map(
                fd,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
            )?);
            records.push(crate::handover::RegionRecord::new(
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                fd,
            ));
        }
        let mem = GuestMemory::new(regions)?;
        if let Some(suppressed) = self.log_limits.request.check() {
            info!(device = %self.name, regions = n, bytes = mem.total_size(), mapped = total, suppressed, "memory table set");
        }
        self.region_repeats.clear();
        self.record.regions = records;
        Ok(self.rt.replace_memory(|_| Ok(Some(mem)))?)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fds: &[OwnedFd],
    ) -> Result<(), Error> {
        let fd = fds.first().ok_or(Error::WrongFdCount {
            request: "ADD_MEM_REG",
            got: 0,
            expected: 1,
        })?;
        // QEMU sends a multi-queue device's regions once per vhost device (one per net
        // queue pair): a region identical to a mapped one is another reference to it, not
        // an overlap.
        let key = (r.guest_phys_addr, r.memory_size);
        let mapped = self.rt.memory().is_some_and(|m| {
            m.region(key.0, key.1)
                .is_some_and(|x| x.uaddr() == r.user_addr)
        });
        if mapped {
            match self.region_repeats.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n = n.saturating_add(1),
                None => self.region_repeats.push((key, 1)),
            }
            debug!(device = %self.name, gpa = key.0, size = key.1, "ADD_MEM_REG of a mapped region: one more reference");
            return Ok(());
        }
        let current = self.rt.memory().map_or(Some(0), |m| {
            m.regions()
                .iter()
                .try_fold(0u64, |sum, x| sum.checked_add(x.mapped_len()))
        });
        let total = current.and_then(|c| c.checked_add(mapped_bytes(r.mmap_offset, r.memory_size)));
        self.check_memory_limit(total)?;
        self.check_seals(fd, r.guest_phys_addr, r.memory_size);
        let region = MemoryRegion::map(
            fd,
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
        )?;
        if let Some(m) = self.rt.memory() {
            m.check_addition(&region)?;
        }
        self.record.regions.push(crate::handover::RegionRecord::new(
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
            fd,
        ));
        Ok(self.rt.replace_memory(|old| {
            let mut regions = old;
            regions.push(region);
            Ok(Some(GuestMemory::new(regions)?))
        })?)
    }

    fn remove_mem_region(&mut self, gpa: u64, size: u64) -> Result<(), Error> {
        if let Some(i) = self
            .region_repeats
            .iter()
            .position(|(k, _)| *k == (gpa, size))
        {
            match self.region_repeats.get_mut(i) {
                Some((_, n)) if *n > 1 => *n -= 1,
                _ => {
                    self.region_repeats.swap_remove(i);
                }
            }
            return Ok(());
        }
        // Checked before the table is taken apart, so a refused removal keeps it.
        if self.rt.memory().and_then(|m| m.region(gpa, size)).is_none() {
            return Err(Error::Memory(uvdpa_virtio::MemoryError::NoSuchRegion {
                gpa,
                size,
            }));
        }
        self.record
            .regions
            .retain(|r| !(r.gpa == gpa && r.size == size));
        Ok(self.rt.replace_memory(|old| {
            let regions: Vec<MemoryRegion> = old
                .into_iter()
                .filter(|r| !(r.gpa() == gpa && r.size() == size))
                .collect();
            Ok(Some(GuestMemory::new(regions)?))
        })?)
    }

    fn set_vring_fd(&mut self, code: FrontendReq, req: &Request) -> Result<(), Error> {
        let name = match code {
            FrontendReq::SET_VRING_KICK => "SET_VRING_KICK",
            FrontendReq::SET_VRING_CALL => "SET_VRING_CALL",
            _ => "SET_VRING_ERR",
        };
        let v: VhostUserU64 = decode(name, &req.body)?;
        let value = v.value;
        const NOFD: u64 = 0x100;
        if value & !(NOFD | 0xff) != 0 {
            return Err(Error::InvalidParam {
                request: name,
                reason: format!("value {value:#x} has reserved bits"),
            });
        }
        let i = self.vring_index((value & 0xff) as u32)?;
        let nofd = value & NOFD != 0;
        expect_fds(name, req, usize::from(!nofd))?;
        let fd = req
            .fds
            .first()
            .and_then(|f| f.try_clone().ok())
            .map(Arc::new);
        if !nofd && fd.is_none() {
            return Err(Error::Worker {
                index: i as u16,
                reason: "cannot duplicate the fd".into(),
            });
        }
        match code {
            FrontendReq::SET_VRING_KICK => Ok(self.rt.reconfigure(i, |v| {
                // A kick fd starts the ring; without one the frontend would poll, which
                // this backend does not support, so the ring stays stopped.
                v.started = fd.is_some();
                v.kick = fd;
            })?),
            FrontendReq::SET_VRING_CALL => {
                // The call fd is the trigger of the vring's vector: swapped in place, the
                // worker keeps running (QEMU re-sends it when the guest masks a vector).
                self.rt
                    .vectors()
                    .set_irqs(i as u16, 1, IrqAction::Eventfd(vec![fd]))
                    .map_err(|e| Error::InvalidParam {
                        request: "SET_VRING_CALL",
                        reason: e.to_string(),
                    })
            }
            _ => Ok(self.rt.reconfigure(i, |v| v.err = fd)?),
        }
    }

    fn get_config(&mut self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let hdr_len = std::mem::size_of::<VhostUserConfig>();
        let (head, payload) = body.split_at(hdr_len.min(body.len()));
        let c: VhostUserConfig = decode("GET_CONFIG", head)?;
        let size = c.size as usize;
        if payload.len() != size || c.offset.saturating_add(c.size) > VHOST_USER_CONFIG_SIZE {
            return Err(Error::BadBodySize {
                request: "GET_CONFIG",
                got: body.len(),
                expected: hdr_len + size,
            });
        }
        let config = self.rt.device().config();
        let mut reply = Vec::with_capacity(hdr_len + size);
        reply.extend_from_slice(head);
        let start = c.offset as usize;
        for k in 0..size {
            reply.push(config.get(start + k).copied().unwrap_or(0));
        }
        Ok(reply)
    }

    /// Ends the session: every vring completes the chains already in its avail ring and
    /// stops, then completed writes are made durable.
    pub fn close(&mut self) {
        self.rt.close();
        self.region_repeats.clear();
        self.log_fd = None;
        self.record = crate::handover::Record::default();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// Bytes of address space a region maps: [`MemoryRegion::map`] maps from offset 0 of the
/// fd (saturating: an overflowing region is refused by the limit, and by the mapping).
fn mapped_bytes(mmap_offset: u64, size: u64) -> u64 {
    mmap_offset.saturating_add(size)
}

/// Requests whose success reply carries data (they never get a bare ack).
fn has_reply(code: FrontendReq) -> bool {
    matches!(
        code,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::GET_STATUS
    )
}

impl AsFd for Session {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conn.as_fd()
    }
}
