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
use uvdpa_runtime::{DeviceRuntime, RuntimeParams};
pub use uvdpa_runtime::{ResCtx, SessionState};
use uvdpa_virtio::dirty::DirtyLog;
use uvdpa_virtio::inflight::InflightMap;
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::loglimit::DeviceLogLimits;
use uvdpa_virtio::memory::MAX_REGIONS;
use uvdpa_virtio::split::MAX_QUEUE_SIZE;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{DeviceStatus, VirtioDevice, VirtioFeatures};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vm_memory::ByteValued;

use crate::connection::{Connection, Request};
use crate::error::Error;

mod config;
mod features;
mod inflight;
mod lifecycle;
mod memory;
mod vrings;
mod wire;

use config::{notify_config_change, BackendChannel};
use features::transport_features;
pub use features::{dirty_log_mode, supported_protocol_features, DirtyLogMode};
use wire::{decode, expect_fds, has_reply, u64_reply};

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
}

impl AsFd for Session {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conn.as_fd()
    }
}
