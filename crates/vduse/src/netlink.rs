//! A client for the kernel's `vdpa` generic netlink family (`include/uapi/linux/vdpa.h`).
//!
//! A VDUSE device created through `/dev/vduse/control` is only a half: a vDPA device must
//! still be added on the `vduse` management device before a driver (virtio-vdpa or
//! vhost-vdpa) can bind to it. That is what `vdpa dev add name D mgmtdev vduse` does, and
//! what [`VdpaNetlink::dev_new`] does here; [`VdpaNetlink::dev_del`] and
//! [`VdpaNetlink::dev_get`] are `vdpa dev del D` and `vdpa dev show D`.
//!
//! Frames are built and parsed with [`neli`]; every request asks for an acknowledgement and
//! every read has a timeout ([`DEFAULT_TIMEOUT`]), so a kernel that never answers turns into
//! [`Error::Timeout`] rather than a hang. Replies carrying another sequence number (left
//! over from a request that timed out earlier) are skipped, at most [`MAX_SKIPPED`] of
//! them per request.

use std::{
    io::{self, Cursor},
    os::fd::{AsRawFd, BorrowedFd},
    sync::Mutex,
    time::Duration,
};

use neli::{
    consts::{
        genl::{CtrlAttr, CtrlCmd},
        nl::{GenlId, NlmF, NlmsgerrAttr},
        socket::{Msg, NlFamily},
    },
    genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, NlattrBuilder},
    nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder},
    socket::NlSocket,
    types::{Buffer, GenlBuffer},
    utils::Groups,
    FromBytes, FromBytesWithInput, Size, ToBytes,
};

/// Name of the generic netlink family (`VDPA_GENL_NAME`, `include/uapi/linux/vdpa.h`).
pub const VDPA_GENL_NAME: &str = "vdpa";
/// Version put in the generic netlink header (`VDPA_GENL_VERSION`,
/// `include/uapi/linux/vdpa.h`).
pub const VDPA_GENL_VERSION: u8 = 1;

/// Commands of the `vdpa` family (`enum vdpa_command`, `include/uapi/linux/vdpa.h`).
pub mod cmd {
    /// `VDPA_CMD_MGMTDEV_GET`: show a management device (can dump).
    pub const MGMTDEV_GET: u8 = 2;
    /// `VDPA_CMD_DEV_NEW`: add a vDPA device on a management device. The kernel also uses
    /// it as the command of its `VDPA_CMD_DEV_GET` replies.
    pub const DEV_NEW: u8 = 3;
    /// `VDPA_CMD_DEV_DEL`: remove a vDPA device.
    pub const DEV_DEL: u8 = 4;
    /// `VDPA_CMD_DEV_GET`: show a vDPA device (can dump).
    pub const DEV_GET: u8 = 5;
}

/// Attributes of the `vdpa` family (`enum vdpa_attr`, `include/uapi/linux/vdpa.h`).
pub mod attr {
    /// `VDPA_ATTR_MGMTDEV_BUS_NAME` (string): bus of the management device, absent for
    /// bus-less ones such as `vduse`.
    pub const MGMTDEV_BUS_NAME: u16 = 1;
    /// `VDPA_ATTR_MGMTDEV_DEV_NAME` (string): name of the management device.
    pub const MGMTDEV_DEV_NAME: u16 = 2;
    /// `VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES` (u64): virtio device ids a management device
    /// can create, as a bit mask.
    pub const MGMTDEV_SUPPORTED_CLASSES: u16 = 3;
    /// `VDPA_ATTR_DEV_NAME` (string): name of the vDPA device.
    pub const DEV_NAME: u16 = 4;
    /// `VDPA_ATTR_DEV_ID` (u32): virtio device id.
    pub const DEV_ID: u16 = 5;
    /// `VDPA_ATTR_DEV_VENDOR_ID` (u32): virtio vendor id.
    pub const DEV_VENDOR_ID: u16 = 6;
    /// `VDPA_ATTR_DEV_MAX_VQS` (u32): number of virtqueues.
    pub const DEV_MAX_VQS: u16 = 7;
    /// `VDPA_ATTR_DEV_MAX_VQ_SIZE` (u16): largest virtqueue size.
    pub const DEV_MAX_VQ_SIZE: u16 = 8;
    /// `VDPA_ATTR_DEV_MIN_VQ_SIZE` (u16): smallest virtqueue size.
    pub const DEV_MIN_VQ_SIZE: u16 = 9;
    /// `VDPA_ATTR_DEV_NET_CFG_MACADDR` (binary, 6 bytes): MAC address of a net device.
    pub const DEV_NET_CFG_MACADDR: u16 = 10;
    /// `VDPA_ATTR_DEV_NET_CFG_MAX_VQP` (u16): queue pairs of a net device.
    pub const DEV_NET_CFG_MAX_VQP: u16 = 12;
    /// `VDPA_ATTR_DEV_NET_CFG_MTU` (u16): MTU of a net device.
    pub const DEV_NET_CFG_MTU: u16 = 13;
}

/// How long one read waits for the kernel. Removing a VDUSE-backed device may wait for
/// the kernel's 30 s VDUSE message timeout, so this is a little longer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(35);

/// How many messages for another sequence number one request skips before giving up.
pub const MAX_SKIPPED: usize = 64;

/// Receive buffer size; `vdpa` replies are a few hundred bytes.
const RECV_BUFFER: usize = 32 * 1024;

/// Version sent to the generic netlink controller (it ignores the value).
const CTRL_VERSION: u8 = 2;

/// A failed `vdpa` netlink operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel has no `vdpa` generic netlink family.
    #[error("the vdpa netlink family is missing: load the vdpa and vduse modules")]
    FamilyMissing,
    /// The kernel refused a request.
    #[error("{cmd} for {target} failed: {}{}", io::Error::from_raw_os_error(*.errno), ext_ack_suffix(.ext_ack))]
    Kernel {
        /// The command, e.g. `VDPA_CMD_DEV_NEW`.
        cmd: &'static str,
        /// What the command was about: a device or family name.
        target: String,
        /// The positive errno the kernel answered with.
        errno: i32,
        /// The extended acknowledgement's message, if the kernel gave one.
        ext_ack: Option<String>,
    },
    /// No answer arrived within the socket's read timeout.
    #[error("{cmd} for {target}: no reply from the kernel within {timeout:?}")]
    Timeout {
        /// The command, e.g. `VDPA_CMD_DEV_DEL`.
        cmd: &'static str,
        /// What the command was about: a device or family name.
        target: String,
        /// The read timeout.
        timeout: Duration,
    },
    /// Sending or receiving on the netlink socket failed.
    #[error("{cmd} for {target}: netlink socket I/O failed")]
    Io {
        /// The command, e.g. `VDPA_CMD_DEV_GET`.
        cmd: &'static str,
        /// What the command was about: a device or family name.
        target: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Opening or configuring the netlink socket failed.
    #[error("cannot set up a generic netlink socket")]
    Socket(#[source] io::Error),
    /// A message could not be encoded, or a reply did not follow the protocol.
    #[error("{cmd} for {target}: {reason}")]
    Protocol {
        /// The command, e.g. `VDPA_CMD_DEV_GET`.
        cmd: &'static str,
        /// What the command was about: a device or family name.
        target: String,
        /// What was wrong.
        reason: String,
    },
}

impl Error {
    /// The kernel's (positive) errno, for [`Error::Kernel`] and [`Error::Io`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Io { source, .. } | Error::Socket(source) => source.raw_os_error(),
            _ => None,
        }
    }

    /// The extended acknowledgement's message of an [`Error::Kernel`], if any.
    pub fn ext_ack(&self) -> Option<&str> {
        match self {
            Error::Kernel { ext_ack, .. } => ext_ack.as_deref(),
            _ => None,
        }
    }
}

fn ext_ack_suffix(ext_ack: &Option<String>) -> String {
    match ext_ack {
        Some(msg) => format!(": {msg}"),
        None => String::new(),
    }
}

/// A management device: the parent handle a vDPA device is created on
/// (`VDPA_ATTR_MGMTDEV_BUS_NAME` + `VDPA_ATTR_MGMTDEV_DEV_NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtDev {
    /// Bus name (e.g. `pci`), `None` for bus-less management devices.
    pub bus: Option<String>,
    /// Device name (e.g. `vduse`, or a PCI address on the `pci` bus).
    pub dev: String,
}

impl MgmtDev {
    /// The VDUSE management device: no bus, device `vduse`.
    pub fn vduse() -> Self {
        MgmtDev {
            bus: None,
            dev: "vduse".to_owned(),
        }
    }
}

impl std::fmt::Display for MgmtDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.bus {
            Some(bus) => write!(f, "{bus}/{}", self.dev),
            None => f.write_str(&self.dev),
        }
    }
}

/// Optional attributes of `VDPA_CMD_DEV_NEW` (`vdpa dev add ... mac M mtu N max_vqp Q`).
///
/// The kernel refuses any the management device does not support; `vduse` supports none of
/// the net ones. Build with `DevNewOptions::default()` and set fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DevNewOptions {
    /// `VDPA_ATTR_DEV_NET_CFG_MACADDR`.
    pub mac: Option<[u8; 6]>,
    /// `VDPA_ATTR_DEV_NET_CFG_MTU`.
    pub mtu: Option<u16>,
    /// `VDPA_ATTR_DEV_NET_CFG_MAX_VQP`.
    pub max_vqp: Option<u16>,
}

/// A vDPA device as `VDPA_CMD_DEV_GET` describes it (`vdpa dev show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdpaDevInfo {
    /// `VDPA_ATTR_DEV_NAME`.
    pub name: String,
    /// The management device it lives on.
    pub mgmtdev: MgmtDev,
    /// `VDPA_ATTR_DEV_ID`: the virtio device id (1 net, 2 blk, ...).
    pub device_id: u32,
    /// `VDPA_ATTR_DEV_VENDOR_ID`: the virtio vendor id.
    pub vendor_id: u32,
    /// `VDPA_ATTR_DEV_MAX_VQS`: number of virtqueues.
    pub max_vqs: u32,
    /// `VDPA_ATTR_DEV_MAX_VQ_SIZE`: largest virtqueue size.
    pub max_vq_size: u16,
    /// `VDPA_ATTR_DEV_MIN_VQ_SIZE`, when the kernel reports one.
    pub min_vq_size: Option<u16>,
}

/// A generic netlink message of any family, with untyped command and attributes.
type GenlMsg = Genlmsghdr<u8, u16>;
/// One attribute with its payload already encoded.
type Attr = neli::genl::Nlattr<u16, Buffer>;

/// What a request is, for error messages.
struct Op<'a> {
    cmd: &'static str,
    target: &'a str,
}

impl Op<'_> {
    fn protocol(&self, reason: impl Into<String>) -> Error {
        Error::Protocol {
            cmd: self.cmd,
            target: self.target.to_owned(),
            reason: reason.into(),
        }
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            cmd: self.cmd,
            target: self.target.to_owned(),
            source,
        }
    }
}

/// A connection to the kernel's `vdpa` generic netlink family.
///
/// Requests are serialized: methods take `&self` and may be called from several threads.
pub struct VdpaNetlink {
    socket: Mutex<Socket>,
    family: u16,
    timeout: Duration,
}

struct Socket {
    sock: NlSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for VdpaNetlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdpaNetlink")
            .field("family", &self.family)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl VdpaNetlink {
    /// Opens a generic netlink socket and resolves the `vdpa` family, with
    /// [`DEFAULT_TIMEOUT`] for every read. Fails with [`Error::FamilyMissing`] when the
    /// kernel has no such family (the `vdpa` module is not loaded).
    pub fn connect() -> Result<Self, Error> {
        Self::connect_with_timeout(DEFAULT_TIMEOUT)
    }

    /// [`VdpaNetlink::connect`] with another read timeout (must not be zero).
    pub fn connect_with_timeout(timeout: Duration) -> Result<Self, Error> {
        if timeout.is_zero() {
            return Err(Error::Socket(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a zero read timeout would mean waiting forever",
            )));
        }
        let mut socket = Socket::open(timeout)?;
        let family = resolve_family(&mut socket, timeout, VDPA_GENL_NAME)?;
        tracing::debug!("vdpa netlink family id {family}");
        Ok(VdpaNetlink {
            socket: Mutex::new(socket),
            family,
            timeout,
        })
    }

    /// The resolved id of the `vdpa` family.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Adds vDPA device `name` on `mgmtdev` (`VDPA_CMD_DEV_NEW`, `vdpa dev add name NAME
    /// mgmtdev MGMTDEV`). For VDUSE, the device must already exist in `/dev/vduse/`.
    pub fn dev_new(&self, name: &str, mgmtdev: &MgmtDev) -> Result<(), Error> {
        self.dev_new_with(name, mgmtdev, &DevNewOptions::default())
    }

    /// [`VdpaNetlink::dev_new`] with optional attributes.
    pub fn dev_new_with(
        &self,
        name: &str,
        mgmtdev: &MgmtDev,
        options: &DevNewOptions,
    ) -> Result<(), Error> {
        let op = Op {
            cmd: "VDPA_CMD_DEV_NEW",
            target: name,
        };
        let attrs = dev_new_attrs(name, mgmtdev, options).map_err(|e| op.protocol(e))?;
        self.request(&op, cmd::DEV_NEW, attrs)?;
        Ok(())
    }

    /// Removes vDPA device `name` (`VDPA_CMD_DEV_DEL`, `vdpa dev del NAME`). The kernel may
    /// take up to its VDUSE message timeout when the userspace side does not answer.
    pub fn dev_del(&self, name: &str) -> Result<(), Error> {
        let op = Op {
            cmd: "VDPA_CMD_DEV_DEL",
            target: name,
        };
        let attrs = name_attrs(name).map_err(|e| op.protocol(e))?;
        self.request(&op, cmd::DEV_DEL, attrs)?;
        Ok(())
    }

    /// Describes vDPA device `name` (`VDPA_CMD_DEV_GET`, `vdpa dev show NAME`); `Ok(None)`
    /// when there is no such device.
    pub fn dev_get(&self, name: &str) -> Result<Option<VdpaDevInfo>, Error> {
        let op = Op {
            cmd: "VDPA_CMD_DEV_GET",
            target: name,
        };
        let attrs = name_attrs(name).map_err(|e| op.protocol(e))?;
        let replies = match self.request(&op, cmd::DEV_GET, attrs) {
            Ok(replies) => replies,
            Err(Error::Kernel { errno, .. }) if errno == enodev() => return Ok(None),
            Err(e) => return Err(e),
        };
        match replies.first() {
            Some(msg) => parse_dev_info(msg).map(Some).map_err(|e| op.protocol(e)),
            None => Ok(None),
        }
    }

    fn request(&self, op: &Op<'_>, cmd: u8, attrs: Vec<Attr>) -> Result<Vec<GenlMsg>, Error> {
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        socket.transact(op, self.family, cmd, VDPA_GENL_VERSION, attrs, self.timeout)
    }
}

/// `ENODEV`, the kernel's answer for an unknown vDPA device.
fn enodev() -> i32 {
    rustix::io::Errno::NODEV.raw_os_error()
}

/// A starting sequence number that differs between sockets of one process.
fn initial_seq() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    nanos | 1
}

/// Asks the generic netlink controller for the id of family `name`.
fn resolve_family(socket: &mut Socket, timeout: Duration, name: &str) -> Result<u16, Error> {
    let op = Op {
        cmd: "CTRL_CMD_GETFAMILY",
        target: name,
    };
    let attrs = vec![string_attr(CtrlAttr::FamilyName.into(), name).map_err(|e| op.protocol(e))?];
    let replies = match socket.transact(
        &op,
        GenlId::Ctrl.into(),
        CtrlCmd::Getfamily.into(),
        CTRL_VERSION,
        attrs,
        timeout,
    ) {
        Ok(replies) => replies,
        Err(Error::Kernel { errno, .. }) if errno == rustix::io::Errno::NOENT.raw_os_error() => {
            return Err(Error::FamilyMissing)
        }
        Err(e) => return Err(e),
    };
    let msg = replies
        .first()
        .ok_or_else(|| op.protocol("the controller sent no family"))?;
    family_id_of(msg).map_err(|e| op.protocol(e))
}

/// The `CTRL_ATTR_FAMILY_ID` of a controller reply.
fn family_id_of(msg: &GenlMsg) -> Result<u16, String> {
    let id = u16::from(CtrlAttr::FamilyId);
    msg.attrs()
        .iter()
        .find(|a| *a.nla_type().nla_type() == id)
        .ok_or_else(|| "the controller's reply has no family id".to_owned())
        .and_then(|a| attr_u16(a.nla_payload().as_ref(), "CTRL_ATTR_FAMILY_ID"))
}

impl Socket {
    /// A generic netlink socket whose reads time out after `timeout`.
    fn open(timeout: Duration) -> Result<Self, Error> {
        let sock =
            NlSocket::connect(NlFamily::Generic, None, Groups::empty()).map_err(Error::Socket)?;
        // SAFETY: the descriptor belongs to `sock`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) };
        rustix::net::sockopt::set_socket_timeout(
            fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )
        .map_err(|e| Error::Socket(e.into()))?;
        // Extended acks carry the kernel's reason for a refusal; not fatal if unsupported.
        if let Err(e) = sock.enable_ext_ack(true) {
            tracing::debug!("vdpa netlink: no extended acks: {e}");
        }
        Ok(Socket {
            sock,
            seq: initial_seq(),
            buf: vec![0; RECV_BUFFER],
        })
    }

    /// Sends one request with `NLM_F_ACK` and collects the data replies up to the
    /// acknowledgement (or `NLMSG_DONE`).
    fn transact(
        &mut self,
        op: &Op<'_>,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: Vec<Attr>,
        timeout: Duration,
    ) -> Result<Vec<GenlMsg>, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = encode_request(family, seq, cmd, version, attrs).map_err(|e| op.protocol(e))?;
        loop {
            match self.sock.send(&bytes, Msg::empty()) {
                Ok(n) if n == bytes.len() => break,
                Ok(n) => {
                    return Err(op.protocol(format!("sent {n} of {} bytes", bytes.len())));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(op.io(e)),
            }
        }

        self.receive(op, seq, timeout)
    }

    /// Collects the replies for `seq` up to its acknowledgement, skipping (a bounded number
    /// of) messages for other sequence numbers.
    fn receive(&mut self, op: &Op<'_>, seq: u32, timeout: Duration) -> Result<Vec<GenlMsg>, Error> {
        let mut data = Vec::new();
        let mut skipped = 0usize;
        loop {
            let len = match self.sock.recv(&mut self.buf[..], Msg::empty()) {
                Ok((len, _)) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Err(Error::Timeout {
                        cmd: op.cmd,
                        target: op.target.to_owned(),
                        timeout,
                    });
                }
                Err(e) => return Err(op.io(e)),
            };
            if len == 0 {
                return Err(op.protocol("the netlink socket returned an empty datagram"));
            }
            let replies = decode_datagram(&self.buf[..len]).map_err(|e| op.protocol(e))?;
            for reply in replies {
                if reply.seq != seq {
                    skipped += 1;
                    tracing::debug!(
                        "{} for {}: skipping a reply for sequence {} (want {seq})",
                        op.cmd,
                        op.target,
                        reply.seq
                    );
                    if skipped > MAX_SKIPPED {
                        return Err(op.protocol(format!(
                            "more than {MAX_SKIPPED} replies for other requests"
                        )));
                    }
                    continue;
                }
                match reply.kind {
                    ReplyKind::Data(msg) => data.push(msg),
                    ReplyKind::Ack | ReplyKind::Done => return Ok(data),
                    ReplyKind::Err { errno, ext_ack } => {
                        return Err(Error::Kernel {
                            cmd: op.cmd,
                            target: op.target.to_owned(),
                            errno,
                            ext_ack,
                        })
                    }
                }
            }
        }
    }
}

/// `VDPA_ATTR_DEV_NAME` alone.
fn name_attrs(name: &str) -> Result<Vec<Attr>, String> {
    Ok(vec![string_attr(attr::DEV_NAME, name)?])
}

/// The attributes of `VDPA_CMD_DEV_NEW`.
fn dev_new_attrs(
    name: &str,
    mgmtdev: &MgmtDev,
    options: &DevNewOptions,
) -> Result<Vec<Attr>, String> {
    let mut attrs = Vec::new();
    if let Some(bus) = &mgmtdev.bus {
        attrs.push(string_attr(attr::MGMTDEV_BUS_NAME, bus)?);
    }
    attrs.push(string_attr(attr::MGMTDEV_DEV_NAME, &mgmtdev.dev)?);
    attrs.push(string_attr(attr::DEV_NAME, name)?);
    if let Some(mac) = options.mac {
        attrs.push(build_attr(
            attr::DEV_NET_CFG_MACADDR,
            Buffer::from(mac.to_vec()),
        )?);
    }
    if let Some(mtu) = options.mtu {
        attrs.push(build_attr(attr::DEV_NET_CFG_MTU, mtu)?);
    }
    if let Some(max_vqp) = options.max_vqp {
        attrs.push(build_attr(attr::DEV_NET_CFG_MAX_VQP, max_vqp)?);
    }
    Ok(attrs)
}

/// A NUL-terminated string attribute (the kernel's `NLA_NUL_STRING`/`NLA_STRING`).
fn string_attr(ty: u16, value: &str) -> Result<Attr, String> {
    if value.is_empty() || value.contains('\0') {
        return Err(format!("invalid name {value:?}"));
    }
    build_attr(ty, value)
}

fn build_attr<P: Size + ToBytes>(ty: u16, payload: P) -> Result<Attr, String> {
    let nla_type = AttrTypeBuilder::default()
        .nla_type(ty)
        .build()
        .map_err(|e| e.to_string())?;
    NlattrBuilder::default()
        .nla_type(nla_type)
        .nla_payload(payload)
        .build()
        .map_err(|e| e.to_string())
}

/// One complete request datagram: `NLM_F_REQUEST | NLM_F_ACK`, port id 0 (the kernel).
fn encode_request(
    family: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: Vec<Attr>,
) -> Result<Vec<u8>, String> {
    let genl = GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(version)
        .attrs(attrs.into_iter().collect::<GenlBuffer<u16, Buffer>>())
        .build()
        .map_err(|e| e.to_string())?;
    let msg = NlmsghdrBuilder::default()
        .nl_type(family)
        .nl_flags(NlmF::REQUEST | NlmF::ACK)
        .nl_seq(seq)
        .nl_pid(0)
        .nl_payload(NlPayload::Payload(genl))
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Cursor::new(Vec::with_capacity(msg.padded_size()));
    msg.to_bytes(&mut out).map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// What one received netlink message means for the request with its sequence number.
#[derive(Debug)]
enum ReplyKind {
    /// A generic netlink message of the family.
    Data(GenlMsg),
    /// `NLMSG_ERROR` with error 0.
    Ack,
    /// `NLMSG_DONE`, the end of a dump.
    Done,
    /// `NLMSG_ERROR` with an errno.
    Err {
        /// Positive errno.
        errno: i32,
        /// `NLMSGERR_ATTR_MSG`, if sent.
        ext_ack: Option<String>,
    },
}

#[derive(Debug)]
struct Reply {
    seq: u32,
    kind: ReplyKind,
}

/// Splits a received datagram into its messages.
fn decode_datagram(bytes: &[u8]) -> Result<Vec<Reply>, String> {
    let mut cursor = Cursor::new(bytes);
    let mut replies = Vec::new();
    while (cursor.position() as usize) < bytes.len() {
        let start = cursor.position() as usize;
        let msg = Nlmsghdr::<u16, Buffer>::from_bytes(&mut cursor)
            .map_err(|e| format!("malformed netlink message at byte {start}: {e}"))?;
        // Continue at the next aligned message whatever the payload parser consumed.
        let next = start + (*msg.nl_len() as usize).next_multiple_of(4);
        cursor.set_position(next.min(bytes.len()) as u64);
        let seq = *msg.nl_seq();
        let kind = match msg.nl_payload() {
            NlPayload::Ack(_) => ReplyKind::Ack,
            NlPayload::DumpExtAck(_) | NlPayload::Empty => ReplyKind::Done,
            NlPayload::Err(err) => ReplyKind::Err {
                errno: err.error().unsigned_abs() as i32,
                ext_ack: err
                    .ext_ack()
                    .iter()
                    .find(|a| *a.nla_type().nla_type() == NlmsgerrAttr::Msg)
                    .map(|a| attr_string(a.nla_payload().as_ref())),
            },
            NlPayload::Payload(payload) => {
                let payload = payload.as_ref();
                let genl = GenlMsg::from_bytes_with_input(&mut Cursor::new(payload), payload.len())
                    .map_err(|e| format!("malformed generic netlink message: {e}"))?;
                ReplyKind::Data(genl)
            }
        };
        replies.push(Reply { seq, kind });
    }
    Ok(replies)
}

/// A `VDPA_CMD_DEV_GET` reply as [`VdpaDevInfo`].
fn parse_dev_info(msg: &GenlMsg) -> Result<VdpaDevInfo, String> {
    let mut name = None;
    let mut bus = None;
    let mut dev = None;
    let mut device_id = None;
    let mut vendor_id = None;
    let mut max_vqs = None;
    let mut max_vq_size = None;
    let mut min_vq_size = None;
    for a in msg.attrs().iter() {
        let p = a.nla_payload().as_ref();
        match *a.nla_type().nla_type() {
            attr::DEV_NAME => name = Some(attr_string(p)),
            attr::MGMTDEV_BUS_NAME => bus = Some(attr_string(p)),
            attr::MGMTDEV_DEV_NAME => dev = Some(attr_string(p)),
            attr::DEV_ID => device_id = Some(attr_u32(p, "VDPA_ATTR_DEV_ID")?),
            attr::DEV_VENDOR_ID => vendor_id = Some(attr_u32(p, "VDPA_ATTR_DEV_VENDOR_ID")?),
            attr::DEV_MAX_VQS => max_vqs = Some(attr_u32(p, "VDPA_ATTR_DEV_MAX_VQS")?),
            attr::DEV_MAX_VQ_SIZE => max_vq_size = Some(attr_u16(p, "VDPA_ATTR_DEV_MAX_VQ_SIZE")?),
            attr::DEV_MIN_VQ_SIZE => min_vq_size = Some(attr_u16(p, "VDPA_ATTR_DEV_MIN_VQ_SIZE")?),
            _ => {}
        }
    }
    let missing = |what: &str| format!("the reply has no {what}");
    Ok(VdpaDevInfo {
        name: name.ok_or_else(|| missing("VDPA_ATTR_DEV_NAME"))?,
        mgmtdev: MgmtDev {
            bus,
            dev: dev.ok_or_else(|| missing("VDPA_ATTR_MGMTDEV_DEV_NAME"))?,
        },
        device_id: device_id.ok_or_else(|| missing("VDPA_ATTR_DEV_ID"))?,
        vendor_id: vendor_id.ok_or_else(|| missing("VDPA_ATTR_DEV_VENDOR_ID"))?,
        max_vqs: max_vqs.ok_or_else(|| missing("VDPA_ATTR_DEV_MAX_VQS"))?,
        max_vq_size: max_vq_size.ok_or_else(|| missing("VDPA_ATTR_DEV_MAX_VQ_SIZE"))?,
        min_vq_size,
    })
}

/// A string attribute's payload, up to its NUL terminator.
fn attr_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

fn attr_u16(payload: &[u8], what: &str) -> Result<u16, String> {
    payload
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| format!("{what} has {} bytes, not 2", payload.len()))
}

fn attr_u32(payload: &[u8], what: &str) -> Result<u32, String> {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| format!("{what} has {} bytes, not 4", payload.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-written netlink framing for the tests, independent of neli.
    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn genl(cmd: u8, version: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![cmd, version, 0, 0];
        for a in attrs {
            v.extend_from_slice(a);
        }
        v
    }

    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_MULTI: u16 = 2;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_CAPPED: u16 = 0x100;
    const NLM_F_ACK_TLVS: u16 = 0x200;
    const NLMSGERR_ATTR_MSG: u16 = 1;
    const NLMSGERR_ATTR_OFFS: u16 = 2;

    fn error_msg(seq: u32, errno: i32, request: &[u8], ext_msg: Option<&str>) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend_from_slice(request);
        let mut flags = 0;
        if let Some(m) = ext_msg {
            let mut s = m.as_bytes().to_vec();
            s.push(0);
            payload.extend_from_slice(&nla(NLMSGERR_ATTR_MSG, &s));
            payload.extend_from_slice(&nla(NLMSGERR_ATTR_OFFS, &20u32.to_ne_bytes()));
            flags |= NLM_F_ACK_TLVS;
        }
        nlmsg(NLMSG_ERROR, flags, seq, &payload)
    }

    fn ack_msg(seq: u32, request: &[u8]) -> Vec<u8> {
        let mut payload = 0i32.to_ne_bytes().to_vec();
        payload.extend_from_slice(&request[..16]);
        nlmsg(NLMSG_ERROR, NLM_F_CAPPED, seq, &payload)
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn netlink_dev_new_request_encoding() {
        let attrs = dev_new_attrs("blk0", &MgmtDev::vduse(), &DevNewOptions::default()).unwrap();
        let bytes = encode_request(0x1c, 7, cmd::DEV_NEW, VDPA_GENL_VERSION, attrs).unwrap();
        let expected = nlmsg(
            0x1c,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &genl(
                cmd::DEV_NEW,
                VDPA_GENL_VERSION,
                &[
                    nla(attr::MGMTDEV_DEV_NAME, &cstr("vduse")),
                    nla(attr::DEV_NAME, &cstr("blk0")),
                ],
            ),
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn netlink_dev_new_request_with_bus_and_options() {
        let mgmt = MgmtDev {
            bus: Some("pci".into()),
            dev: "0000:00:04.0".into(),
        };
        let options = DevNewOptions {
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            mtu: Some(9000),
            max_vqp: Some(4),
        };
        let attrs = dev_new_attrs("net0", &mgmt, &options).unwrap();
        let bytes = encode_request(0x20, 1, cmd::DEV_NEW, VDPA_GENL_VERSION, attrs).unwrap();
        let expected = nlmsg(
            0x20,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            &genl(
                cmd::DEV_NEW,
                VDPA_GENL_VERSION,
                &[
                    nla(attr::MGMTDEV_BUS_NAME, &cstr("pci")),
                    nla(attr::MGMTDEV_DEV_NAME, &cstr("0000:00:04.0")),
                    nla(attr::DEV_NAME, &cstr("net0")),
                    nla(attr::DEV_NET_CFG_MACADDR, &[0x52, 0x54, 0, 1, 2, 3]),
                    nla(attr::DEV_NET_CFG_MTU, &9000u16.to_ne_bytes()),
                    nla(attr::DEV_NET_CFG_MAX_VQP, &4u16.to_ne_bytes()),
                ],
            ),
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn netlink_rejects_bad_names() {
        assert!(name_attrs("").is_err());
        assert!(name_attrs("a\0b").is_err());
    }

    #[test]
    fn netlink_request_round_trips_through_the_decoder() {
        let bytes = encode_request(
            0x1c,
            9,
            cmd::DEV_DEL,
            VDPA_GENL_VERSION,
            name_attrs("blk0").unwrap(),
        )
        .unwrap();
        let replies = decode_datagram(&bytes).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].seq, 9);
        let ReplyKind::Data(msg) = &replies[0].kind else {
            panic!("not data: {:?}", replies[0].kind)
        };
        assert_eq!(*msg.cmd(), cmd::DEV_DEL);
        assert_eq!(*msg.version(), VDPA_GENL_VERSION);
        let attrs: Vec<_> = msg.attrs().iter().collect();
        assert_eq!(attrs.len(), 1);
        assert_eq!(*attrs[0].nla_type().nla_type(), attr::DEV_NAME);
        assert_eq!(attr_string(attrs[0].nla_payload().as_ref()), "blk0");
    }

    fn dev_get_reply(seq: u32, with_min: bool, with_bus: bool) -> Vec<u8> {
        let mut attrs = vec![nla(attr::DEV_NAME, &cstr("blk0"))];
        if with_bus {
            attrs.push(nla(attr::MGMTDEV_BUS_NAME, &cstr("pci")));
        }
        attrs.extend([
            nla(attr::MGMTDEV_DEV_NAME, &cstr("vduse")),
            nla(attr::DEV_ID, &2u32.to_ne_bytes()),
            nla(attr::DEV_VENDOR_ID, &0u32.to_ne_bytes()),
            nla(attr::DEV_MAX_VQS, &4u32.to_ne_bytes()),
            nla(attr::DEV_MAX_VQ_SIZE, &256u16.to_ne_bytes()),
        ]);
        if with_min {
            attrs.push(nla(attr::DEV_MIN_VQ_SIZE, &1u16.to_ne_bytes()));
        }
        // An attribute this client does not know is ignored.
        attrs.push(nla(60, &[1, 2, 3, 4, 5, 6, 7, 8]));
        nlmsg(0x1c, 0, seq, &genl(cmd::DEV_NEW, VDPA_GENL_VERSION, &attrs))
    }

    #[test]
    fn netlink_dev_get_reply_decodes() {
        let request = encode_request(
            0x1c,
            5,
            cmd::DEV_GET,
            VDPA_GENL_VERSION,
            name_attrs("blk0").unwrap(),
        )
        .unwrap();
        // The reply and the acknowledgement in one datagram, as the kernel sends them.
        let mut datagram = dev_get_reply(5, true, false);
        datagram.extend(ack_msg(5, &request));
        let replies = decode_datagram(&datagram).unwrap();
        assert_eq!(replies.len(), 2);
        assert!(matches!(replies[1].kind, ReplyKind::Ack));
        let ReplyKind::Data(msg) = &replies[0].kind else {
            panic!("not data: {:?}", replies[0].kind)
        };
        let info = parse_dev_info(msg).unwrap();
        assert_eq!(
            info,
            VdpaDevInfo {
                name: "blk0".into(),
                mgmtdev: MgmtDev::vduse(),
                device_id: 2,
                vendor_id: 0,
                max_vqs: 4,
                max_vq_size: 256,
                min_vq_size: Some(1),
            }
        );

        let replies = decode_datagram(&dev_get_reply(6, false, true)).unwrap();
        let ReplyKind::Data(msg) = &replies[0].kind else {
            panic!("not data")
        };
        let info = parse_dev_info(msg).unwrap();
        assert_eq!(info.min_vq_size, None);
        assert_eq!(info.mgmtdev.bus.as_deref(), Some("pci"));
        assert_eq!(info.mgmtdev.to_string(), "pci/vduse");
    }

    #[test]
    fn netlink_dev_get_reply_missing_attrs_is_an_error() {
        let bytes = nlmsg(
            0x1c,
            0,
            1,
            &genl(
                cmd::DEV_NEW,
                1,
                &[
                    nla(attr::DEV_NAME, &cstr("blk0")),
                    nla(attr::DEV_ID, &[1, 2]),
                ],
            ),
        );
        let replies = decode_datagram(&bytes).unwrap();
        let ReplyKind::Data(msg) = &replies[0].kind else {
            panic!("not data")
        };
        let err = parse_dev_info(msg).unwrap_err();
        assert!(err.contains("VDPA_ATTR_DEV_ID has 2 bytes"), "{err}");
    }

    #[test]
    fn netlink_error_reply_with_ext_ack() {
        let request = encode_request(
            0x1c,
            3,
            cmd::DEV_NEW,
            VDPA_GENL_VERSION,
            dev_new_attrs("blk0", &MgmtDev::vduse(), &DevNewOptions::default()).unwrap(),
        )
        .unwrap();
        let bytes = error_msg(3, 17, &request, Some("device already exists"));
        let replies = decode_datagram(&bytes).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].seq, 3);
        let ReplyKind::Err { errno, ext_ack } = &replies[0].kind else {
            panic!("not an error: {:?}", replies[0].kind)
        };
        assert_eq!(*errno, 17);
        assert_eq!(ext_ack.as_deref(), Some("device already exists"));

        let err = Error::Kernel {
            cmd: "VDPA_CMD_DEV_NEW",
            target: "blk0".into(),
            errno: *errno,
            ext_ack: None,
        };
        assert_eq!(
            err.to_string(),
            "VDPA_CMD_DEV_NEW for blk0 failed: File exists (os error 17)"
        );
        assert_eq!(err.errno(), Some(17));
        let err = Error::Kernel {
            cmd: "VDPA_CMD_DEV_NEW",
            target: "blk0".into(),
            errno: *errno,
            ext_ack: ext_ack.clone(),
        };
        assert_eq!(
            err.to_string(),
            "VDPA_CMD_DEV_NEW for blk0 failed: File exists (os error 17): device already exists"
        );
        assert_eq!(err.ext_ack(), Some("device already exists"));
    }

    #[test]
    fn netlink_error_reply_without_ext_ack() {
        let request = encode_request(
            0x1c,
            4,
            cmd::DEV_GET,
            VDPA_GENL_VERSION,
            name_attrs("nope").unwrap(),
        )
        .unwrap();
        let replies = decode_datagram(&error_msg(4, 19, &request, None)).unwrap();
        let ReplyKind::Err { errno, ext_ack } = &replies[0].kind else {
            panic!("not an error")
        };
        assert_eq!((*errno, ext_ack.as_deref()), (19, None));
        assert_eq!(19, enodev());
    }

    #[test]
    fn netlink_done_and_foreign_seq() {
        let mut datagram = dev_get_reply(10, false, false);
        datagram.extend(nlmsg(NLMSG_DONE, NLM_F_MULTI, 11, &0i32.to_ne_bytes()));
        let replies = decode_datagram(&datagram).unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].seq, 10);
        assert_eq!(replies[1].seq, 11);
        assert!(matches!(replies[1].kind, ReplyKind::Done));
    }

    #[test]
    fn netlink_truncated_datagram_is_an_error() {
        let bytes = dev_get_reply(1, true, false);
        assert!(decode_datagram(&bytes[..bytes.len() - 8]).is_err());
    }

    #[test]
    fn netlink_family_id_from_controller_reply() {
        let bytes = nlmsg(
            0x10,
            0,
            1,
            &genl(
                1,
                2,
                &[
                    nla(CtrlAttr::FamilyName.into(), &cstr("vdpa")),
                    nla(CtrlAttr::FamilyId.into(), &0x1cu16.to_ne_bytes()),
                ],
            ),
        );
        let replies = decode_datagram(&bytes).unwrap();
        let ReplyKind::Data(msg) = &replies[0].kind else {
            panic!("not data")
        };
        assert_eq!(family_id_of(msg).unwrap(), 0x1c);
    }

    /// The real request path against the controller family, which every kernel has.
    #[test]
    fn netlink_resolves_the_controller_family_itself() {
        let mut socket = Socket::open(Duration::from_secs(5)).unwrap();
        let timeout = Duration::from_secs(5);
        assert_eq!(
            resolve_family(&mut socket, timeout, "nlctrl").unwrap(),
            0x10
        );
        assert!(matches!(
            resolve_family(&mut socket, timeout, "uvdpa-nosuch"),
            Err(Error::FamilyMissing)
        ));
        // The kernel's extended ack reaches the error: names are at most 15 bytes.
        let err = resolve_family(&mut socket, timeout, "uvdpa-name-too-long").unwrap_err();
        assert_eq!(err.errno(), Some(22), "{err}");
        assert!(err.ext_ack().is_some(), "{err}");
        assert!(
            err.to_string().starts_with(
                "CTRL_CMD_GETFAMILY for uvdpa-name-too-long failed: Invalid argument (os error 22)"
            ),
            "{err}"
        );
    }

    /// A reply to an earlier request (here one sent by hand) is skipped, not taken for the
    /// answer to the next one.
    #[test]
    fn netlink_skips_a_stale_reply() {
        let timeout = Duration::from_secs(5);
        let mut socket = Socket::open(timeout).unwrap();
        let stale_seq = socket.seq.wrapping_sub(10);
        let stale = encode_request(
            GenlId::Ctrl.into(),
            stale_seq,
            CtrlCmd::Getfamily.into(),
            CTRL_VERSION,
            vec![string_attr(CtrlAttr::FamilyName.into(), "nlctrl").unwrap()],
        )
        .unwrap();
        assert_eq!(socket.sock.send(&stale, Msg::empty()).unwrap(), stale.len());
        // The stale request names a family that exists, the new one one that does not: the
        // answer must be the new one's.
        assert!(matches!(
            resolve_family(&mut socket, timeout, "uvdpa-nosuch"),
            Err(Error::FamilyMissing)
        ));
    }

    /// A read with nothing to receive ends in the timeout rather than blocking.
    #[test]
    fn netlink_read_times_out() {
        let timeout = Duration::from_millis(100);
        let mut socket = Socket::open(timeout).unwrap();
        let op = Op {
            cmd: "CTRL_CMD_GETFAMILY",
            target: "nlctrl",
        };
        // Nothing was sent, so nothing arrives.
        socket.seq = socket.seq.wrapping_add(1);
        let started = std::time::Instant::now();
        let err = socket.receive(&op, socket.seq, timeout).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() >= timeout / 2);
        assert_eq!(
            err.to_string(),
            "CTRL_CMD_GETFAMILY for nlctrl: no reply from the kernel within 100ms"
        );
    }

    #[test]
    fn netlink_zero_timeout_is_refused() {
        let err = VdpaNetlink::connect_with_timeout(Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::Socket(_)), "{err:?}");
    }

    /// On a kernel without the `vdpa` family this must be the "family missing" error; where
    /// the family exists, connecting and looking up an absent device must work.
    #[test]
    fn netlink_connect_on_this_host() {
        match VdpaNetlink::connect() {
            Ok(nl) => {
                assert_ne!(nl.family_id(), 0);
                assert_eq!(nl.dev_get("uvdpa-netlink-test-absent").unwrap(), None);
            }
            Err(Error::FamilyMissing) => {
                assert_eq!(
                    Error::FamilyMissing.to_string(),
                    "the vdpa netlink family is missing: load the vdpa and vduse modules"
                );
            }
            Err(e) => panic!("unexpected error: {e} ({e:?})"),
        }
    }
}
