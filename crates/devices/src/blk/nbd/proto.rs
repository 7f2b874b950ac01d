//! The NBD wire format (the NBD protocol, `doc/proto.md` of NetworkBlockDevice/nbd): magic
//! numbers, flags, option and command codes, and the fixed-size messages of the fixed
//! newstyle handshake and of the transmission phase. All integers are big-endian.
//!
//! Encoders write into caller-provided arrays; decoders take exactly the bytes of a
//! fixed-size header and check nothing but its layout (what a field *may* hold is checked
//! by the caller, which knows the request it belongs to).

/// `NBDMAGIC`: first 8 bytes from a server (both handshake styles).
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle handshake's second magic, and the prefix of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply (fixed newstyle).
pub(crate) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_ABORT`.
pub(crate) const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`.
pub(crate) const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;

/// `NBD_REP_ACK`.
pub(crate) const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub(crate) const REP_INFO: u32 = 3;
/// Bit 31 marks an error reply.
pub(crate) const REP_ERR: u32 = 1 << 31;

/// `NBD_INFO_EXPORT`.
pub(crate) const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`.
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Most bytes of option reply payload the client accepts (an error message, an info): a
/// larger one is a hostile server.
pub(crate) const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most bytes of an error message the client keeps (the spec's string limit).
pub(crate) const MAX_MESSAGE: usize = 4096;

/// Name of an option reply type, for messages.
pub(crate) fn rep_name(rep: u32) -> &'static str {
    match rep {
        REP_ACK => "NBD_REP_ACK",
        2 => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        4 => "NBD_REP_META_CONTEXT",
        0x8000_0001 => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        r if r & REP_ERR != 0 => "an unknown NBD_REP_ERR",
        _ => "an unknown reply",
    }
}

bitflags::bitflags! {
    /// Transmission flags (NBD protocol, "Transmission flags").
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`: always set.
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY`: the export refuses writes.
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is understood.
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is understood.
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL`.
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is understood.
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` on reads.
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across connections.
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE`.
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE`.
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` on write-zeroes.
        const SEND_FAST_ZERO = 1 << 11;
        // Flags a later server sets are kept (and ignored).
        const _ = !0;
    }
}

/// Command types (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum Cmd {
    /// `NBD_CMD_READ`.
    Read = 0,
    /// `NBD_CMD_WRITE`.
    Write = 1,
    /// `NBD_CMD_DISC`.
    Disc = 2,
    /// `NBD_CMD_FLUSH`.
    Flush = 3,
    /// `NBD_CMD_TRIM`.
    Trim = 4,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes = 6,
}

/// Command flag `NBD_CMD_FLAG_NO_HOLE` (write-zeroes: keep the range allocated).
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF` (read: at most one content chunk).
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;

/// Bytes of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header (and of the part of a structured chunk header that
/// names its magic, flags, type and cookie).
pub(crate) const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub(crate) const CHUNK_HEADER_LEN: usize = 20;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit 15 of a chunk type marks an error chunk.
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// A request header (NBD protocol, "Request message").
pub(crate) fn encode_request(
    out: &mut [u8; REQUEST_LEN],
    flags: u16,
    cmd: Cmd,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
}

/// An option request header; `len` bytes of data follow it.
pub(crate) fn encode_option(out: &mut [u8; 16], option: u32, len: u32) {
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&len.to_be_bytes());
}

/// The 16 bytes every reply starts with, decoded by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyStart {
    /// A simple reply: complete.
    Simple {
        /// The error (0 = success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk; its 4-byte payload length follows.
    Chunk {
        /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
    },
    /// Neither magic: the stream is corrupt.
    BadMagic(u32),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

pub(crate) fn be_u16_at(b: &[u8], at: usize) -> u16 {
    be_u16(b, at)
}

/// Decodes the first 16 bytes of a reply (NBD protocol, "Simple reply message",
/// "Structured reply chunk message").
pub(crate) fn decode_reply_start(b: &[u8; SIMPLE_REPLY_LEN]) -> ReplyStart {
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => ReplyStart::Simple {
            error: be_u32(b, 4),
            cookie: be_u64(b, 8),
        },
        STRUCTURED_REPLY_MAGIC => ReplyStart::Chunk {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            cookie: be_u64(b, 8),
        },
        other => ReplyStart::BadMagic(other),
    }
}

/// Name of an NBD error value, for messages.
pub(crate) fn error_name(e: u32) -> &'static str {
    match e {
        1 => "NBD_EPERM",
        5 => "NBD_EIO",
        12 => "NBD_ENOMEM",
        22 => "NBD_EINVAL",
        28 => "NBD_ENOSPC",
        75 => "NBD_EOVERFLOW",
        95 => "NBD_ENOTSUP",
        108 => "NBD_ESHUTDOWN",
        _ => "an unknown NBD error",
    }
}

/// `NBD_ESHUTDOWN`: the server is going away; the client disconnects softly.
pub(crate) const ESHUTDOWN: u32 = 108;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let mut b = [0u8; REQUEST_LEN];
        encode_request(
            &mut b,
            CMD_FLAG_NO_HOLE,
            Cmd::WriteZeroes,
            0x0102_0304_0506_0708,
            4096,
            512,
        );
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 2, 0, 6, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
    }

    #[test]
    fn option_layout() {
        let mut b = [0u8; 16];
        encode_option(&mut b, OPT_GO, 9);
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(&b[8..], &[0, 0, 0, 7, 0, 0, 0, 9]);
    }

    #[test]
    fn reply_starts_decode_by_magic() {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..].copy_from_slice(&77u64.to_be_bytes());
        assert_eq!(
            decode_reply_start(&b),
            ReplyStart::Simple {
                error: 5,
                cookie: 77
            }
        );
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        b[6..8].copy_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(
            decode_reply_start(&b),
            ReplyStart::Chunk {
                flags: 1,
                kind: 1,
                cookie: 77
            }
        );
        b[..4].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decode_reply_start(&b), ReplyStart::BadMagic(0x0102_0304));
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
