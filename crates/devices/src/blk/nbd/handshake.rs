//! Connecting to an NBD server: the socket, and the fixed newstyle handshake (NBD protocol,
//! "Fixed newstyle negotiation", "Option types") up to the transmission phase.
//!
//! The handshake is blocking and bounded: every read and write waits at most until the
//! deadline given by the caller, and every length the server sends is checked before
//! anything is read (option replies at most [`MAX_OPTION_REPLY`] bytes, at most
//! [`MAX_INFO_REPLIES`] informational replies). The client asks for structured replies
//! (`NBD_OPT_STRUCTURED_REPLY`; a server that does not know them gets simple replies) and
//! ends the handshake with `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`, falling back to
//! `NBD_OPT_EXPORT_NAME` only when the server answers `NBD_REP_ERR_UNSUP`.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::proto::{
    be_u16_at, be_u32, be_u64, encode_option, encode_request, rep_name, Cmd, TransmissionFlags,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, MAX_MESSAGE, MAX_OPTION_REPLY, NBDMAGIC, OPT_ABORT, OPT_GO,
    OPT_STRUCTURED_REPLY, REPLY_MAGIC, REP_ACK, REP_ERR, REP_INFO, REQUEST_LEN,
};
use super::uri::{NbdAddress, NbdUri};
use super::NbdError;

/// `NBD_OPT_EXPORT_NAME`: the old way to end the handshake (no error replies).
const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_REP_ERR_UNSUP`.
const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Most `NBD_REP_INFO` replies accepted for one option.
pub(crate) const MAX_INFO_REPLIES: usize = 64;
/// Largest payload the client sends in one NBD_CMD_READ/WRITE whatever the server
/// allows: 32 MiB, what the protocol says every server accepts ("Size constraints").
pub(crate) const MAX_PAYLOAD_CAP: u32 = 1 << 25;
/// Magic of an oldstyle server (after NBDMAGIC), refused.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// What the server said about the export at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Minimum block size: offsets and lengths of requests are multiples of it (1 when the
    /// server did not say).
    pub min_block: u32,
    /// Preferred block size (4096 when the server did not say).
    pub preferred_block: u32,
    /// Largest READ/WRITE payload the client sends: the server's maximum, at most
    /// 32 MiB, a multiple of `min_block`.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
}

/// The deadline of a blocking handshake.
struct Deadline(Instant);

impl Deadline {
    fn left(&self) -> io::Result<Duration> {
        self.0
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))
    }
}

/// A blocking stream with timeouts, either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeout(&self, d: Duration) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(Some(d))?;
                s.set_write_timeout(Some(d))
            }
            Self::Unix(s) => {
                s.set_read_timeout(Some(d))?;
                s.set_write_timeout(Some(d))
            }
        }
    }

    fn read_exact(
        &mut self,
        buf: &mut [u8],
        dl: &Deadline,
        step: &'static str,
    ) -> Result<(), NbdError> {
        let io = |source| NbdError::Handshake { step, source };
        self.set_timeout(dl.left().map_err(io)?).map_err(io)?;
        match self {
            Self::Tcp(s) => s.read_exact(buf),
            Self::Unix(s) => s.read_exact(buf),
        }
        .map_err(|e| io(timed_out(e)))
    }

    fn write_all(&mut self, buf: &[u8], dl: &Deadline, step: &'static str) -> Result<(), NbdError> {
        let io = |source| NbdError::Handshake { step, source };
        self.set_timeout(dl.left().map_err(io)?).map_err(io)?;
        match self {
            Self::Tcp(s) => s.write_all(buf),
            Self::Unix(s) => s.write_all(buf),
        }
        .map_err(|e| io(timed_out(e)))
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        match self {
            Self::Tcp(s) => {
                s.set_nonblocking(true)?;
                Ok(s.into())
            }
            Self::Unix(s) => {
                s.set_nonblocking(true)?;
                Ok(s.into())
            }
        }
    }
}

/// A socket timeout reads as EAGAIN: say what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "the server did not answer in time")
    } else {
        e
    }
}

fn open(uri: &NbdUri, dl: &Deadline) -> Result<Stream, NbdError> {
    let address = uri.address_string();
    let fail = |source| NbdError::Connect {
        address: address.clone(),
        source,
    };
    match &uri.address {
        NbdAddress::Unix { socket } => UnixStream::connect(socket).map(Stream::Unix).map_err(fail),
        NbdAddress::Tcp { host, port } => {
            let addrs = (host.as_str(), *port).to_socket_addrs().map_err(fail)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, dl.left().map_err(fail)?) {
                    Ok(s) => {
                        // Requests and replies are small messages: never wait for more.
                        s.set_nodelay(true).map_err(fail)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(fail(last))
        }
    }
}

/// One option reply: its type and (bounded) payload.
struct OptReply {
    rep: u32,
    data: Vec<u8>,
}

fn send_option(s: &mut Stream, dl: &Deadline, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut hdr = [0u8; 16];
    let len =
        u32::try_from(data.len()).map_err(|_| NbdError::Protocol("option too long".into()))?;
    encode_option(&mut hdr, option, len);
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&hdr);
    msg.extend_from_slice(data);
    s.write_all(&msg, dl, "sending an option")
}

fn read_reply(s: &mut Stream, dl: &Deadline, option: u32) -> Result<OptReply, NbdError> {
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr, dl, "reading an option reply")?;
    if be_u64(&hdr, 0) != REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "option reply magic {:#x}, not {REPLY_MAGIC:#x}",
            be_u64(&hdr, 0)
        )));
    }
    if be_u32(&hdr, 8) != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {} while option {option} was asked",
            be_u32(&hdr, 8)
        )));
    }
    let rep = be_u32(&hdr, 12);
    let len = be_u32(&hdr, 16);
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol(format!(
            "option reply of {len} bytes (at most {MAX_OPTION_REPLY})"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data, dl, "reading an option reply")?;
    Ok(OptReply { rep, data })
}

/// The message text of an error reply, bounded and printable.
fn message(data: &[u8]) -> String {
    let d = data.get(..MAX_MESSAGE.min(data.len())).unwrap_or_default();
    String::from_utf8_lossy(d)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Checks the block size constraints of `NBD_INFO_BLOCK_SIZE` ("Size constraints").
fn block_sizes(min: u32, pref: u32, max: u32) -> Result<(u32, u32, u32), NbdError> {
    let bad = |why: &str| {
        Err(NbdError::Protocol(format!(
            "invalid block sizes (minimum {min}, preferred {pref}, maximum payload {max}): {why}"
        )))
    };
    if !min.is_power_of_two() || min > 65536 {
        return bad("the minimum is not a power of two up to 64 KiB");
    }
    if !pref.is_power_of_two() || pref < min.max(512) {
        return bad("the preferred size is not a power of two at least max(minimum, 512)");
    }
    if max < pref {
        return bad("the maximum payload is below the preferred size");
    }
    Ok((min, pref, max))
}

/// Connects to `uri` and negotiates until the transmission phase; returns the socket
/// (non-blocking) and what the server said about the export. Takes at most `timeout`.
///
/// # Errors
/// [`NbdError::Connect`] (no server there), [`NbdError::Handshake`] (the connection
/// failed or timed out during the handshake), [`NbdError::Refused`] (the server refused
/// the export, with its reason: e.g. `NBD_REP_ERR_UNKNOWN` for an unknown export name),
/// [`NbdError::Protocol`] (the server broke the protocol or is not a fixed newstyle
/// server).
pub(crate) fn connect(uri: &NbdUri, timeout: Duration) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let dl = Deadline(Instant::now() + timeout);
    let mut s = open(uri, &dl)?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello[..16], &dl, "reading the server's greeting")?;
    if be_u64(&hello, 0) != NBDMAGIC {
        return Err(NbdError::Protocol(format!(
            "greeting {:#x} is not NBDMAGIC: not an NBD server",
            be_u64(&hello, 0)
        )));
    }
    match be_u64(&hello, 8) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(NbdError::Protocol(
                "the server speaks the oldstyle handshake, which is not supported".into(),
            ))
        }
        other => {
            return Err(NbdError::Protocol(format!(
                "unknown handshake magic {other:#x}"
            )))
        }
    }
    s.read_exact(&mut hello[16..18], &dl, "reading the handshake flags")?;
    let hflags = be_u16_at(&hello, 16);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not speak the fixed newstyle handshake".into(),
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes(), &dl, "sending the client flags")?;

    send_option(&mut s, &dl, OPT_STRUCTURED_REPLY, &[])?;
    let r = read_reply(&mut s, &dl, OPT_STRUCTURED_REPLY)?;
    let structured = match r.rep {
        REP_ACK => true,
        rep if rep & REP_ERR != 0 && rep != REP_ERR | 7 => false,
        rep => {
            return Err(NbdError::Refused {
                export: uri.export.clone(),
                reply: rep_name(rep),
                message: message(&r.data),
            })
        }
    };

    let name = uri.export.as_bytes();
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut go = Vec::with_capacity(name.len() + 8);
    go.extend_from_slice(&name_len.to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(&mut s, &dl, OPT_GO, &go)?;
    let mut export: Option<(u64, TransmissionFlags)> = None;
    let mut sizes = None;
    let mut infos = 0;
    loop {
        let r = read_reply(&mut s, &dl, OPT_GO)?;
        match r.rep {
            REP_INFO => {
                infos += 1;
                if infos > MAX_INFO_REPLIES {
                    return Err(NbdError::Protocol(format!(
                        "more than {MAX_INFO_REPLIES} NBD_REP_INFO replies"
                    )));
                }
                match (be_u16_at(&r.data, 0), r.data.len()) {
                    (INFO_EXPORT, 12) => {
                        export = Some((
                            be_u64(&r.data, 2),
                            TransmissionFlags::from_bits_retain(be_u16_at(&r.data, 10)),
                        ))
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        sizes = Some(block_sizes(
                            be_u32(&r.data, 2),
                            be_u32(&r.data, 6),
                            be_u32(&r.data, 10),
                        )?)
                    }
                    (INFO_EXPORT | INFO_BLOCK_SIZE, n) => {
                        return Err(NbdError::Protocol(format!(
                            "NBD_REP_INFO type {} of {n} bytes",
                            be_u16_at(&r.data, 0)
                        )))
                    }
                    // Other information is ignored, as the protocol asks.
                    _ => {}
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                export = Some(export_name(&mut s, &dl, name, no_zeroes)?);
                break;
            }
            rep => {
                // Best effort: tell the server we are leaving.
                let _ = send_option(&mut s, &dl, OPT_ABORT, &[]);
                return Err(NbdError::Refused {
                    export: uri.export.clone(),
                    reply: rep_name(rep),
                    message: message(&r.data),
                });
            }
        }
    }
    let (size, flags) = export.ok_or_else(|| {
        NbdError::Protocol("NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT".into())
    })?;
    let (min_block, preferred_block, max) = sizes.unwrap_or((1, 4096, MAX_PAYLOAD_CAP));
    let max_payload = (max.min(MAX_PAYLOAD_CAP) / min_block).max(1) * min_block;
    let info = ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_payload,
        structured,
    };
    let fd = s.into_fd().map_err(|source| NbdError::Handshake {
        step: "switching the socket to non-blocking",
        source,
    })?;
    Ok((fd, info))
}

/// `NBD_OPT_EXPORT_NAME`, for servers without `NBD_OPT_GO`: the reply is the size, the
/// flags and (unless NO_ZEROES) 124 zero bytes; an unknown export closes the connection.
fn export_name(
    s: &mut Stream,
    dl: &Deadline,
    name: &[u8],
    no_zeroes: bool,
) -> Result<(u64, TransmissionFlags), NbdError> {
    send_option(s, dl, OPT_EXPORT_NAME, name)?;
    let mut r = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { r.len() };
    s.read_exact(
        &mut r[..len],
        dl,
        "reading the NBD_OPT_EXPORT_NAME reply (an unknown export closes the connection)",
    )?;
    Ok((
        be_u64(&r, 0),
        TransmissionFlags::from_bits_retain(be_u16_at(&r, 8)),
    ))
}

/// Ends a transmission phase politely (`NBD_CMD_DISC`) on a blocking or non-blocking
/// socket; errors are ignored (the socket is closed next anyway).
pub(crate) fn disconnect(fd: &OwnedFd) {
    let mut req = [0u8; REQUEST_LEN];
    encode_request(&mut req, 0, Cmd::Disc, 0, 0, 0);
    let _ = rustix::net::send(fd, &req, rustix::net::SendFlags::NOSIGNAL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(block_sizes(1, 4096, 0xffff_ffff).is_ok());
        assert!(block_sizes(512, 512, 512).is_ok());
        assert!(block_sizes(3, 4096, 1 << 20).is_err());
        assert!(block_sizes(1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(block_sizes(1, 256, 1 << 20).is_err());
        assert!(block_sizes(4096, 512, 1 << 20).is_err());
        assert!(block_sizes(1, 4096, 4095).is_err());
    }

    #[test]
    fn error_messages_are_bounded_and_printable() {
        assert_eq!(message(b"no such export\n"), "no such export");
        assert_eq!(message(&[b'a'; 10_000]).len(), MAX_MESSAGE);
        assert_eq!(message(b"a\x1b[31mb"), "a [31mb");
    }
}
