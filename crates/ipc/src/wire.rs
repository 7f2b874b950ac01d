//! The wire format: an 88-byte little-endian header followed by a JSON payload, one message
//! per SEQPACKET record (see the crate documentation for the layout).

use serde_json::Value;

use crate::error::{code, IpcError};

/// `"UVDP"` read as a little-endian `u32`: the first four bytes of every message.
pub const MAGIC: u32 = u32::from_le_bytes(*b"UVDP");
/// The wire version this crate speaks.
pub const VERSION: u16 = 1;
/// Size of the action field: names are 1..=64 bytes, NUL-padded.
pub const ACTION_LEN: usize = 64;
/// Size of the fixed header in bytes.
pub const HEADER_SIZE: usize = 88;
/// Largest JSON payload, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest message (header and payload), in bytes; a longer record is truncated by the
/// kernel (MSG_TRUNC) and the connection is closed.
pub const MAX_MESSAGE: usize = HEADER_SIZE + MAX_PAYLOAD;
/// Most fds attached to one message (SCM_RIGHTS).
pub const MAX_FDS: usize = 8;
/// Action of error replies to messages whose own action could not be read.
pub const ERROR_ACTION: &str = "ipc.error";
/// Action of the notification the primary sends to each accepted secondary, before anything
/// else; its payload is `{"client_id": N, "version": 1}`.
pub const WELCOME_ACTION: &str = "ipc.welcome";

const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 6;
const OFF_RESERVED: usize = 7;
const OFF_STATUS: usize = 8;
const OFF_REQ_ID: usize = 12;
const OFF_ACTION: usize = 20;
const OFF_PAYLOAD_LEN: usize = OFF_ACTION + ACTION_LEN;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A secondary asks the primary; exactly one reply follows.
    Request = 1,
    /// The primary answers a request (same `req_id`).
    Reply = 2,
    /// The primary tells a secondary something unasked (`req_id` 0).
    Notification = 3,
}

impl TryFrom<u8> for Kind {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(Self::Request),
            2 => Ok(Self::Reply),
            3 => Ok(Self::Notification),
            other => Err(other),
        }
    }
}

/// The fixed header, field by field, as raw values (nothing validated yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Must be [`VERSION`].
    pub version: u16,
    /// A [`Kind`].
    pub kind: u8,
    /// Must be 0.
    pub reserved: u8,
    /// 0 for success, a negative errno-like code (see [`code`]) for an error reply.
    pub status: i32,
    /// Request id chosen by the secondary, echoed in the reply; 0 in notifications.
    pub req_id: u64,
    /// Action name, NUL-padded.
    pub action: [u8; ACTION_LEN],
    /// Number of payload bytes after the header.
    pub payload_len: u32,
}

impl Header {
    /// Decodes the header bytes (no validation: see [`Header::action_name`] and `decode`).
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let mut action = [0u8; ACTION_LEN];
        action.copy_from_slice(&b[OFF_ACTION..OFF_PAYLOAD_LEN]);
        Self {
            magic: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            version: u16::from_le_bytes([b[OFF_VERSION], b[OFF_VERSION + 1]]),
            kind: b[OFF_KIND],
            reserved: b[OFF_RESERVED],
            status: i32::from_le_bytes([
                b[OFF_STATUS],
                b[OFF_STATUS + 1],
                b[OFF_STATUS + 2],
                b[OFF_STATUS + 3],
            ]),
            req_id: u64::from_le_bytes([
                b[OFF_REQ_ID],
                b[OFF_REQ_ID + 1],
                b[OFF_REQ_ID + 2],
                b[OFF_REQ_ID + 3],
                b[OFF_REQ_ID + 4],
                b[OFF_REQ_ID + 5],
                b[OFF_REQ_ID + 6],
                b[OFF_REQ_ID + 7],
            ]),
            action,
            payload_len: u32::from_le_bytes([
                b[OFF_PAYLOAD_LEN],
                b[OFF_PAYLOAD_LEN + 1],
                b[OFF_PAYLOAD_LEN + 2],
                b[OFF_PAYLOAD_LEN + 3],
            ]),
        }
    }

    /// Encodes the header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..OFF_VERSION].copy_from_slice(&self.magic.to_le_bytes());
        b[OFF_VERSION..OFF_KIND].copy_from_slice(&self.version.to_le_bytes());
        b[OFF_KIND] = self.kind;
        b[OFF_RESERVED] = self.reserved;
        b[OFF_STATUS..OFF_REQ_ID].copy_from_slice(&self.status.to_le_bytes());
        b[OFF_REQ_ID..OFF_ACTION].copy_from_slice(&self.req_id.to_le_bytes());
        b[OFF_ACTION..OFF_PAYLOAD_LEN].copy_from_slice(&self.action);
        b[OFF_PAYLOAD_LEN..HEADER_SIZE].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// The action name, if the field holds a valid one: 1..=64 bytes of `[a-z0-9._-]`
    /// followed only by NULs.
    pub fn action_name(&self) -> Option<&str> {
        let len = self
            .action
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(ACTION_LEN);
        let (name, pad) = self.action.split_at(len);
        if pad.iter().any(|&c| c != 0) {
            return None;
        }
        let name = std::str::from_utf8(name).ok()?;
        valid_action(name).then_some(name)
    }
}

/// Whether `name` is a valid action name: 1..=64 bytes of `[a-z0-9._-]`.
pub fn valid_action(name: &str) -> bool {
    (1..=ACTION_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

/// Checks an action name, as [`valid_action`].
///
/// # Errors
/// [`IpcError::InvalidAction`].
pub fn check_action(name: &str) -> Result<(), IpcError> {
    if valid_action(name) {
        Ok(())
    } else {
        Err(IpcError::InvalidAction(name.to_owned()))
    }
}

/// Encodes one message (header and payload) in a single buffer.
///
/// # Errors
/// [`IpcError::InvalidAction`], [`IpcError::PayloadTooLarge`].
pub fn encode(
    kind: Kind,
    status: i32,
    req_id: u64,
    action: &str,
    payload: &Value,
) -> Result<Vec<u8>, IpcError> {
    check_action(action)?;
    let body = serde_json::to_vec(payload)
        .map_err(|e| IpcError::Protocol(format!("Cannot serialize payload: {e}")))?;
    let payload_len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l as usize <= MAX_PAYLOAD)
        .ok_or(IpcError::PayloadTooLarge {
            len: body.len(),
            max: MAX_PAYLOAD,
        })?;
    let mut name = [0u8; ACTION_LEN];
    name[..action.len()].copy_from_slice(action.as_bytes());
    let hdr = Header {
        magic: MAGIC,
        version: VERSION,
        kind: kind as u8,
        reserved: 0,
        status,
        req_id,
        action: name,
        payload_len,
    };
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    out.extend_from_slice(&hdr.to_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Encodes an error reply: `status` (made negative if it is not) and payload
/// `{"error": message}`. The message is shortened if it would not fit.
pub fn encode_error(req_id: u64, action: &str, status: i32, message: &str) -> Vec<u8> {
    let status = if status < 0 { status } else { code::EIO };
    let action = if valid_action(action) {
        action
    } else {
        ERROR_ACTION
    };
    let mut message = message;
    // JSON escaping can at most sextuple a message (`\u00XX`); keep well inside the limit.
    let limit = MAX_PAYLOAD / 8;
    if message.len() > limit {
        let mut end = limit;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message = message.get(..end).unwrap_or_default();
    }
    let payload = serde_json::json!({ "error": message });
    encode(Kind::Reply, status, req_id, action, &payload).unwrap_or_else(|_| {
        // Unreachable in practice (valid action, bounded message): send a bare header.
        let mut name = [0u8; ACTION_LEN];
        name[..ERROR_ACTION.len()].copy_from_slice(ERROR_ACTION.as_bytes());
        Header {
            magic: MAGIC,
            version: VERSION,
            kind: Kind::Reply as u8,
            reserved: 0,
            status,
            req_id,
            action: name,
            payload_len: 0,
        }
        .to_bytes()
        .to_vec()
    })
}

/// A validated message.
#[derive(Debug)]
pub(crate) struct Message {
    pub kind: Kind,
    pub status: i32,
    pub req_id: u64,
    pub action: String,
    pub payload: Value,
}

/// Why a received message was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The header cannot be trusted (short message, wrong magic): report with `req_id` 0
    /// and close the connection.
    Fatal { code: i32, message: String },
    /// The header is readable: answer `req_id` with an error reply and go on.
    Reply {
        req_id: u64,
        action: String,
        code: i32,
        message: String,
    },
}

/// Decodes and validates one received record, in a fixed order: length, magic, version,
/// kind, reserved byte, action, payload length, JSON.
pub(crate) fn decode(bytes: &[u8]) -> Result<Message, Fault> {
    let Some(raw) = bytes.first_chunk::<HEADER_SIZE>() else {
        return Err(Fault::Fatal {
            code: code::EPROTO,
            message: format!(
                "message of {} bytes is shorter than the {HEADER_SIZE}-byte header",
                bytes.len()
            ),
        });
    };
    let hdr = Header::parse(raw);
    if hdr.magic != MAGIC {
        return Err(Fault::Fatal {
            code: code::EPROTO,
            message: format!("bad magic {:#010x}", hdr.magic),
        });
    }
    let action = hdr.action_name().unwrap_or(ERROR_ACTION).to_owned();
    let fault = |code: i32, message: String| Fault::Reply {
        req_id: hdr.req_id,
        action: action.clone(),
        code,
        message,
    };
    if hdr.version != VERSION {
        return Err(fault(
            code::EPROTONOSUPPORT,
            format!("version {} not supported (expected {VERSION})", hdr.version),
        ));
    }
    let kind = Kind::try_from(hdr.kind)
        .map_err(|k| fault(code::EINVAL, format!("unknown message kind {k}")))?;
    if hdr.reserved != 0 {
        return Err(fault(
            code::EINVAL,
            format!("reserved byte is {:#04x}, not 0", hdr.reserved),
        ));
    }
    if hdr.action_name().is_none() {
        return Err(fault(
            code::EINVAL,
            "invalid action name (1..=64 bytes of [a-z0-9._-], NUL-padded)".to_owned(),
        ));
    }
    let body = bytes.get(HEADER_SIZE..).unwrap_or_default();
    if hdr.payload_len as usize != body.len() {
        return Err(fault(
            code::EINVAL,
            format!(
                "payload_len is {} but {} payload bytes were received",
                hdr.payload_len,
                body.len()
            ),
        ));
    }
    if body.len() > MAX_PAYLOAD {
        return Err(fault(
            code::EMSGSIZE,
            format!("payload of {} bytes exceeds {MAX_PAYLOAD}", body.len()),
        ));
    }
    let payload = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| fault(code::EINVAL, format!("payload is not valid JSON: {e}")))?
    };
    Ok(Message {
        kind,
        status: hdr.status,
        req_id: hdr.req_id,
        action,
        payload,
    })
}

/// The `error` message of an error reply's payload, or a placeholder.
pub(crate) fn error_message(payload: &Value) -> String {
    payload
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("(no message)")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn header_layout() {
        let mut action = [0u8; ACTION_LEN];
        action[..7].copy_from_slice(b"dev.add");
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            kind: Kind::Reply as u8,
            reserved: 0,
            status: -2,
            req_id: 0x0102_0304_0506_0708,
            action,
            payload_len: 0x11223344,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"UVDP");
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(b[6], 2);
        assert_eq!(b[7], 0);
        assert_eq!(&b[8..12], &(-2i32).to_le_bytes());
        assert_eq!(&b[12..20], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[20..27], b"dev.add");
        assert!(b[27..84].iter().all(|&c| c == 0));
        assert_eq!(&b[84..88], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(Header::parse(&b), h);
        assert_eq!(h.action_name(), Some("dev.add"));
    }

    #[test]
    fn action_names() {
        assert!(valid_action("dev.add"));
        assert!(valid_action("a"));
        assert!(valid_action("res_show-2"));
        assert!(valid_action(&"x".repeat(64)));
        assert!(!valid_action(""));
        assert!(!valid_action(&"x".repeat(65)));
        assert!(!valid_action("Dev"));
        assert!(!valid_action("dev add"));
        assert!(!valid_action("dév"));
        assert!(matches!(
            check_action("A"),
            Err(IpcError::InvalidAction(a)) if a == "A"
        ));
    }

    #[test]
    fn action_field_padding() {
        let mut h = Header::parse(&[0; HEADER_SIZE]);
        assert_eq!(h.action_name(), None, "empty");
        h.action = [b'a'; ACTION_LEN];
        assert_eq!(h.action_name(), Some(&*"a".repeat(64)), "full, no NUL");
        h.action = [0; ACTION_LEN];
        h.action[0] = b'a';
        h.action[2] = b'b';
        assert_eq!(h.action_name(), None, "garbage after the NUL");
    }

    #[test]
    fn round_trip() {
        let b = encode(Kind::Request, 0, 9, "dev.show", &json!({"name": "blk0"})).unwrap();
        let m = decode(&b).unwrap();
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.req_id, 9);
        assert_eq!(m.status, 0);
        assert_eq!(m.action, "dev.show");
        assert_eq!(m.payload, json!({"name": "blk0"}));
    }

    #[test]
    fn encode_limits() {
        let big = Value::String("x".repeat(MAX_PAYLOAD));
        assert!(matches!(
            encode(Kind::Request, 0, 1, "a", &big),
            Err(IpcError::PayloadTooLarge {
                max: MAX_PAYLOAD,
                ..
            })
        ));
        assert!(matches!(
            encode(Kind::Request, 0, 1, "A", &Value::Null),
            Err(IpcError::InvalidAction(_))
        ));
        let e = encode_error(3, "bad name!", 0, &"é".repeat(MAX_PAYLOAD));
        let m = decode(&e).unwrap();
        assert_eq!(m.action, ERROR_ACTION);
        assert_eq!(m.status, code::EIO);
        assert!(error_message(&m.payload).len() <= MAX_PAYLOAD / 8);
    }

    #[test]
    fn decode_faults() {
        let good = encode(Kind::Request, 0, 5, "x", &json!(1)).unwrap();
        assert!(matches!(decode(&good[..10]), Err(Fault::Fatal { .. })));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(Fault::Fatal { .. })));
        let reply_code = |b: &[u8]| match decode(b) {
            Err(Fault::Reply {
                code, req_id: 5, ..
            }) => code,
            other => panic!("{other:?}"),
        };
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(reply_code(&b), code::EPROTONOSUPPORT);
        let mut b = good.clone();
        b[6] = 9;
        assert_eq!(reply_code(&b), code::EINVAL);
        let mut b = good.clone();
        b[7] = 1;
        assert_eq!(reply_code(&b), code::EINVAL);
        let mut b = good.clone();
        b[20] = b'X';
        assert_eq!(reply_code(&b), code::EINVAL);
        let mut b = good.clone();
        b.push(b' ');
        assert_eq!(reply_code(&b), code::EINVAL);
        let mut b = good.clone();
        *b.last_mut().unwrap() = b'}';
        assert_eq!(reply_code(&b), code::EINVAL);
        let empty = encode_error(1, "x", code::ENOENT, "m");
        let mut b = empty[..HEADER_SIZE].to_vec();
        b[84..88].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&b).unwrap().payload, Value::Null);
    }
}
