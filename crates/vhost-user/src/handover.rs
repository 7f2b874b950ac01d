//! Live upgrade of a vhost-user session: the state a new daemon process needs to go on
//! serving a connected frontend that never sees a disconnect.
//!
//! A session's state is handed over as the vhost-user requests that rebuild it
//! ([`Session::image`]): SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES, the backend
//! channel, the memory table (SET_MEM_TABLE, or ADD_MEM_REG per region with
//! CONFIGURE_MEM_SLOTS), SET_INFLIGHT_FD, NET_SET_MTU and SET_CONFIG writes, then per
//! vring SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE and finally SET_STATUS, each with
//! duplicates of the fds the frontend gave. The new daemon feeds them to a fresh session
//! ([`Session::replay`]) through the same decoding and checks as the frontend's own
//! requests, so a state that does not validate is refused like hostile input. The image is
//! taken while the runtime holds every vring stopped ([`Session::hold`]): requests already
//! popped have completed, so each ring's base is both its next avail and its next used
//! position, and the new daemon starts the rings there.
//!
//! Not handed over (refused with [`Error::Handover`]): a session with a dirty log (a
//! migration in progress) and one whose device needs a reset.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};
use tracing::info;
use uvdpa_virtio::VirtioFeatures;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;

use crate::connection::{Header, Request, MAX_BODY, MAX_FDS};
use crate::error::Error;
use crate::session::Session;

/// Version of the handed-over session layout ([`WireRequest`] lists); a daemon refuses
/// any other.
pub const HANDOVER_VERSION: u32 = 1;

/// Most requests one session image may hold (8 regions × repeats, 5 per vring of at most
/// 257 vrings, a few more): bounds what a new daemon accepts.
pub const MAX_IMAGE_REQUESTS: usize = 4096;

/// Most SET_CONFIG writes remembered per session (the latest of each offset and size).
const MAX_CONFIG_WRITES: usize = 16;

/// A mapped memory region as the frontend described it, with a duplicate of its fd.
pub(crate) struct RegionRecord {
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    uaddr: u64,
    offset: u64,
    /// `None` when the fd could not be duplicated (the session then cannot be handed over).
    fd: Option<OwnedFd>,
}

impl RegionRecord {
    pub(crate) fn new(gpa: u64, size: u64, uaddr: u64, offset: u64, fd: &OwnedFd) -> Self {
        Self {
            gpa,
            size,
            uaddr,
            offset,
            fd: fd.try_clone().ok(),
        }
    }
}

/// What a session keeps only to hand itself over: what the runtime does not hold.
#[derive(Default)]
pub(crate) struct Record {
    /// The memory regions in the order they were added.
    pub(crate) regions: Vec<RegionRecord>,
    /// The SET_INFLIGHT_FD body (the buffer's fd is the runtime's map's).
    pub(crate) inflight: Option<Vec<u8>>,
    /// NET_SET_MTU's value.
    pub(crate) mtu: Option<u16>,
    /// SET_CONFIG bodies, oldest first, one per (offset, size).
    config: Vec<(u32, u32, Vec<u8>)>,
}

impl Record {
    /// Remembers a SET_CONFIG body (replacing an earlier write of the same range).
    pub(crate) fn config_written(&mut self, body: &[u8], offset: u32, size: u32) {
        self.config.retain(|(o, s, _)| (*o, *s) != (offset, size));
        if self.config.len() >= MAX_CONFIG_WRITES {
            self.config.remove(0);
        }
        self.config.push((offset, size, body.to_vec()));
    }
}

/// One request of a session image as it travels between daemons (its fds travel beside
/// it, in order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireRequest {
    /// vhost-user request code.
    pub request: u32,
    /// Message body.
    pub body: Vec<u8>,
    /// How many of the accompanying fds are this request's.
    pub fds: usize,
}

/// Splits a session image into its wire form and its fds (in request order).
pub fn to_wire(image: Vec<Request>) -> (Vec<WireRequest>, Vec<OwnedFd>) {
    let mut fds = Vec::new();
    let wire = image
        .into_iter()
        .map(|r| {
            let n = r.fds.len();
            fds.extend(r.fds);
            WireRequest {
                request: r.hdr.request,
                body: r.body,
                fds: n,
            }
        })
        .collect();
    (wire, fds)
}

/// Rebuilds a session image from its wire form and fds.
///
/// # Errors
/// [`Error::Handover`]: more than [`MAX_IMAGE_REQUESTS`] requests, a body over
/// [`MAX_BODY`] bytes, more than [`MAX_FDS`] fds on one request, or fd counts that do not
/// add up to the fds given.
pub fn from_wire(wire: Vec<WireRequest>, fds: Vec<OwnedFd>) -> Result<Vec<Request>, Error> {
    let bad = |why: String| Err(Error::Handover(why));
    if wire.len() > MAX_IMAGE_REQUESTS {
        return bad(format!(
            "{} requests (at most {MAX_IMAGE_REQUESTS})",
            wire.len()
        ));
    }
    let wanted: usize = wire.iter().map(|w| w.fds).fold(0, usize::saturating_add);
    if wanted != fds.len() {
        return bad(format!("requests name {wanted} fds, {} came", fds.len()));
    }
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(wire.len());
    for w in wire {
        if w.body.len() > MAX_BODY || w.fds > MAX_FDS {
            return bad(format!(
                "request {} with {} body bytes and {} fds (at most {MAX_BODY} and {MAX_FDS})",
                w.request,
                w.body.len(),
                w.fds
            ));
        }
        out.push(Request {
            hdr: Header {
                request: w.request,
                flags: 0x1,
                size: w.body.len() as u32,
            },
            body: w.body,
            fds: fds.by_ref().take(w.fds).collect(),
        });
    }
    Ok(out)
}

/// A connected frontend's session as a new daemon needs it.
pub struct SessionHandover {
    /// The connected vhost-user socket (a duplicate).
    pub stream: OwnedFd,
    /// The requests that rebuild the session ([`Session::image`]), with their fds.
    pub image: Vec<Request>,
    /// The frontend's pid (SO_PEERCRED), if known.
    pub frontend_pid: Option<u32>,
}

fn request(code: FrontendReq, body: &[u8], fds: Vec<OwnedFd>) -> Request {
    Request {
        hdr: Header {
            request: code as u32,
            flags: 0x1,
            size: body.len() as u32,
        },
        body: body.to_vec(),
        fds,
    }
}

fn u64_request(code: FrontendReq, v: u64, fds: Vec<OwnedFd>) -> Request {
    request(code, VhostUserU64::new(v).as_slice(), fds)
}

fn dup(fd: impl AsFd, what: &str) -> Result<OwnedFd, Error> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::Handover(format!("cannot duplicate the {what} fd: {e}")))
}

impl Session {
    /// Holds every vring stopped (requests already popped complete first) so the session
    /// can be imaged or handed over; nothing starts until [`Session::release`].
    pub fn hold(&mut self) {
        let stopped = self.rt.hold();
        info!(device = %self.name, vrings = stopped.len(), "vrings held");
    }

    /// Whether the vrings are held ([`Session::hold`], or a session rebuilt by
    /// [`Session::replay`] that was not released yet).
    pub fn held(&self) -> bool {
        self.rt.held()
    }

    /// Lets go of a held session another daemon serves now: nothing is drained, flushed
    /// or sent (see [`uvdpa_runtime::DeviceRuntime::abandon`]).
    pub fn abandon(&mut self) {
        self.rt.abandon();
    }

    /// Ends a [`Session::hold`]: the vrings that are ready start at their bases.
    ///
    /// # Errors
    /// A vring that cannot start.
    pub fn release(&mut self) -> Result<(), Error> {
        self.rt.release()?;
        self.publish_state();
        Ok(())
    }

    /// The requests that rebuild this session in a new daemon (see the module docs), with
    /// duplicates of every fd. Call it between [`Session::hold`] and the handover.
    ///
    /// # Errors
    /// [`Error::Handover`]: the vrings are not held, a migration is in progress (dirty log
    /// set), the device needs a reset, or an fd cannot be duplicated.
    pub fn image(&self) -> Result<Vec<Request>, Error> {
        use FrontendReq as R;
        if !self.rt.held() {
            return Err(Error::Handover("vrings are not held".into()));
        }
        if self.rt.has_dirty_log() {
            return Err(Error::Handover(
                "the frontend set a dirty log (a migration is in progress)".into(),
            ));
        }
        if self.rt.needs_reset() {
            return Err(Error::Handover("the device needs a reset".into()));
        }
        let mut out = Vec::new();
        if self.protocol_negotiated {
            out.push(u64_request(
                R::SET_PROTOCOL_FEATURES,
                self.protocol.bits(),
                Vec::new(),
            ));
        }
        out.push(request(R::SET_OWNER, &[], Vec::new()));
        let acked = self.rt.acked();
        if !acked.is_empty() {
            out.push(u64_request(R::SET_FEATURES, acked.bits(), Vec::new()));
        }
        let channel = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sock) = channel.as_ref() {
            out.push(request(
                R::SET_BACKEND_REQ_FD,
                &[],
                vec![dup(sock, "backend channel")?],
            ));
        }
        drop(channel);
        self.image_memory(&mut out)?;
        if let (Some(body), Some(map)) = (&self.record.inflight, self.rt.inflight()) {
            out.push(request(
                R::SET_INFLIGHT_FD,
                body,
                vec![dup(map.fd(), "inflight")?],
            ));
        }
        if let Some(mtu) = self.record.mtu {
            out.push(u64_request(R::NET_SET_MTU, u64::from(mtu), Vec::new()));
        }
        for (_, _, body) in &self.record.config {
            out.push(request(R::SET_CONFIG, body, Vec::new()));
        }
        let enables = self.protocol_negotiated
            || acked.contains(VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES);
        for i in 0..self.rt.num_vrings() {
            self.image_vring(i, enables, &mut out)?;
        }
        if self.protocol.contains(VhostUserProtocolFeatures::STATUS) {
            let status = self.rt.device_status().bits();
            if status != 0 {
                out.push(u64_request(R::SET_STATUS, u64::from(status), Vec::new()));
            }
        }
        Ok(out)
    }

    fn image_memory(&self, out: &mut Vec<Request>) -> Result<(), Error> {
        let regions = &self.record.regions;
        if regions.is_empty() {
            return Ok(());
        }
        let fd_of = |r: &RegionRecord| -> Result<OwnedFd, Error> {
            let fd = r.fd.as_ref().ok_or_else(|| {
                Error::Handover(format!("memory region at {:#x}: no fd kept", r.gpa))
            })?;
            dup(fd, "memory region")
        };
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            for r in regions {
                let body = VhostUserSingleMemoryRegion::new(r.gpa, r.size, r.uaddr, r.offset);
                let repeats = self
                    .region_repeats
                    .iter()
                    .find(|(k, _)| *k == (r.gpa, r.size))
                    .map_or(0, |(_, n)| *n);
                for _ in 0..=repeats {
                    out.push(request(
                        FrontendReq::ADD_MEM_REG,
                        body.as_slice(),
                        vec![fd_of(r)?],
                    ));
                }
            }
            return Ok(());
        }
        if regions.len() > MAX_FDS {
            return Err(Error::Handover(format!(
                "{} memory regions without CONFIGURE_MEM_SLOTS",
                regions.len()
            )));
        }
        let mut body = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        let mut fds = Vec::with_capacity(regions.len());
        for r in regions {
            let m = VhostUserMemoryRegion::new(r.gpa, r.size, r.uaddr, r.offset);
            body.extend_from_slice(m.as_slice());
            fds.push(fd_of(r)?);
        }
        out.push(request(FrontendReq::SET_MEM_TABLE, &body, fds));
        Ok(())
    }

    fn image_vring(&self, i: usize, enables: bool, out: &mut Vec<Request>) -> Result<(), Error> {
        use FrontendReq as R;
        let Some(v) = self.rt.vring(i) else {
            return Ok(());
        };
        let index = i as u32;
        let state = |code, num: u32| {
            request(
                code,
                VhostUserVringState::new(index, num).as_slice(),
                Vec::new(),
            )
        };
        if v.size != 0 {
            out.push(state(R::SET_VRING_NUM, u32::from(v.size)));
        }
        if let Some((desc, avail, used)) = v.addr {
            let a = VhostUserVringAddr {
                index,
                descriptor: desc,
                available: avail,
                used,
                ..Default::default()
            };
            out.push(request(R::SET_VRING_ADDR, a.as_slice(), Vec::new()));
        }
        if v.base_set {
            out.push(state(R::SET_VRING_BASE, u32::from(v.base)));
        }
        if let (Some(kick), true) = (&v.kick, v.started) {
            out.push(u64_request(
                R::SET_VRING_KICK,
                u64::from(index),
                vec![dup(&**kick, "kick")?],
            ));
        }
        if let Ok(Some(call)) = self.rt.vectors().trigger_fd(i as u16) {
            out.push(u64_request(
                R::SET_VRING_CALL,
                u64::from(index),
                vec![dup(&*call, "call")?],
            ));
        }
        if let Some(err) = &v.err {
            out.push(u64_request(
                R::SET_VRING_ERR,
                u64::from(index),
                vec![dup(&**err, "err")?],
            ));
        }
        if enables {
            out.push(state(R::SET_VRING_ENABLE, u32::from(v.enabled)));
        }
        Ok(())
    }

    /// Rebuilds the state of an image made by [`Session::image`] in this fresh session,
    /// with its vrings held (start them with [`Session::release`]). Nothing is sent to
    /// the frontend.
    ///
    /// # Errors
    /// [`Error::Handover`] naming the first request the session refused, and why.
    pub fn replay(&mut self, image: Vec<Request>) -> Result<(), Error> {
        self.rt.hold();
        for req in image {
            let code = req
                .hdr
                .code()
                .ok_or_else(|| Error::Handover(format!("unknown request {}", req.hdr.request)))?;
            self.dispatch(code, &req)
                .map_err(|e| Error::Handover(format!("{code:?} refused: {e}")))?;
        }
        self.publish_state();
        Ok(())
    }
}
