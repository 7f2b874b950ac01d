//! Every malformed input, sent by hand on a raw SEQPACKET socket: the primary answers with
//! an error (or closes when the header cannot be trusted) and keeps serving.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use common::{Raw, TestDir, LONG};
use serde_json::{json, Value};
use uvdpa_ipc::wire::{self, Kind, HEADER_SIZE, MAX_MESSAGE};
use uvdpa_ipc::{code, Primary, Reply, Secondary, MAX_FDS};

fn primary(dir: &TestDir) -> Primary {
    let p = Primary::bind(dir.sock()).unwrap();
    p.register("echo", |req, _| Ok(Reply::new(req.payload.clone())))
        .unwrap();
    p.register("count.fds", |req, _| {
        Ok(Reply::new(json!({"fds": req.fds.len()})))
    })
    .unwrap();
    p
}

fn request(req_id: u64, action: &str, payload: &Value) -> Vec<u8> {
    wire::encode(Kind::Request, 0, req_id, action, payload).unwrap()
}

/// The connection still answers a good request.
fn still_served(raw: &Raw) {
    raw.request(4242, "echo", &json!("alive"));
    let d = raw.recv_msg();
    assert_eq!(d.header.req_id, 4242);
    assert_eq!(d.header.status, 0);
    assert_eq!(d.payload, "alive");
}

/// Sends `bytes`, expects an error reply to `req_id` with `status`, and a live connection.
fn expect_error_reply(dir: &TestDir, bytes: &[u8], req_id: u64, status: i32) -> String {
    let (raw, _) = Raw::connect(&dir.sock());
    raw.send(bytes);
    let (id, st, message) = raw.recv_error();
    assert_eq!((id, st), (req_id, status), "{message}");
    still_served(&raw);
    message
}

/// Sends `bytes`, expects one error with req_id 0 and `status`, then the connection closed.
fn expect_error_then_close(dir: &TestDir, bytes: &[u8], status: i32) -> String {
    let (raw, _) = Raw::connect(&dir.sock());
    raw.send(bytes);
    let (id, st, message) = raw.recv_error();
    assert_eq!((id, st), (0, status), "{message}");
    raw.expect_eof();
    message
}

#[test]
fn unknown_action() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let (raw, _) = Raw::connect(&dir.sock());
    raw.request(7, "dev.nope", &Value::Null);
    let d = raw.recv_msg();
    assert_eq!(d.header.kind, Kind::Reply as u8);
    assert_eq!(d.header.req_id, 7);
    assert_eq!(d.header.status, code::ENOENT);
    assert_eq!(d.header.action_name(), Some("dev.nope"));
    assert_eq!(d.payload, json!({"error": "unknown action dev.nope"}));
    still_served(&raw);
}

#[test]
fn wrong_magic_closes() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let mut b = request(1, "echo", &json!(1));
    b[..4].copy_from_slice(b"VHUP");
    let m = expect_error_then_close(&dir, &b, code::EPROTO);
    assert!(m.contains("bad magic"), "{m}");
}

#[test]
fn wrong_version_is_answered() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let mut b = request(3, "echo", &json!(1));
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    let m = expect_error_reply(&dir, &b, 3, code::EPROTONOSUPPORT);
    assert!(m.contains("version 2"), "{m}");
}

#[test]
fn shorter_than_header_closes() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let b = request(1, "echo", &json!(1));
    let m = expect_error_then_close(&dir, &b[..HEADER_SIZE - 1], code::EPROTO);
    assert!(m.contains("shorter than"), "{m}");
    expect_error_then_close(&dir, b"UVDP", code::EPROTO);
}

#[test]
fn empty_record_closes() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let (raw, _) = Raw::connect(&dir.sock());
    raw.send(&[]);
    raw.expect_eof();
}

#[test]
fn payload_len_mismatch() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let good = request(5, "echo", &json!({"a": 1}));
    let len = (good.len() - HEADER_SIZE) as u32;
    for claimed in [len + 1, len - 1, 0, u32::MAX] {
        let mut b = good.clone();
        b[84..88].copy_from_slice(&claimed.to_le_bytes());
        let m = expect_error_reply(&dir, &b, 5, code::EINVAL);
        assert!(m.contains("payload_len"), "{m}");
    }
    // Bytes cut off the end.
    let m = expect_error_reply(&dir, &good[..good.len() - 2], 5, code::EINVAL);
    assert!(m.contains("payload_len"), "{m}");
}

#[test]
fn oversized_message_closes() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let (raw, _) = Raw::connect(&dir.sock());
    let mut b = request(6, "echo", &Value::Null);
    b.resize(MAX_MESSAGE + 1, b' ');
    let len = (b.len() - HEADER_SIZE) as u32;
    b[84..88].copy_from_slice(&len.to_le_bytes());
    raw.send(&b);
    raw.expect_eof();
    // Others are still served.
    let (other, _) = Raw::connect(&dir.sock());
    still_served(&other);
}

#[test]
fn too_many_fds_are_refused_and_closed() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let (raw, _) = Raw::connect(&dir.sock());
    let (mut ours, theirs) = UnixStream::pair().unwrap();

    // Exactly MAX_FDS is fine.
    let max: Vec<BorrowedFd<'_>> = (0..MAX_FDS).map(|_| theirs.as_fd()).collect();
    raw.send_fds(&request(1, "count.fds", &Value::Null), &max);
    let d = raw.recv_msg();
    assert_eq!((d.header.req_id, d.header.status), (1, 0));
    assert_eq!(d.payload["fds"], MAX_FDS);

    // One more is refused: E2BIG, and no copy stays open in the primary.
    let over: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| theirs.as_fd()).collect();
    raw.send_fds(&request(2, "count.fds", &Value::Null), &over);
    let (id, status, message) = raw.recv_error();
    assert_eq!((id, status), (2, code::E2BIG));
    assert!(message.contains("fds"), "{message}");
    drop(theirs);
    ours.set_read_timeout(Some(LONG)).unwrap();
    let mut rest = Vec::new();
    // EOF: every copy of `theirs` is closed (a leaked one would block until the timeout).
    assert_eq!(ours.read_to_end(&mut rest).unwrap(), 0);
    still_served(&raw);
}

#[test]
fn invalid_json_payload() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let mut b = request(8, "echo", &json!({"a": 1}));
    b.truncate(b.len() - 1);
    b.extend_from_slice(b",");
    let m = expect_error_reply(&dir, &b, 8, code::EINVAL);
    assert!(m.starts_with("payload is not valid JSON"), "{m}");
    // Not UTF-8 at all.
    let mut b = request(9, "echo", &json!("ab"));
    let n = b.len();
    b[n - 2] = 0xff;
    expect_error_reply(&dir, &b, 9, code::EINVAL);
}

#[test]
fn invalid_action_field() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let good = request(10, "echo", &Value::Null);
    let with_action = |f: &dyn Fn(&mut [u8])| {
        let mut b = good.clone();
        f(&mut b[20..84]);
        b
    };
    let cases = [
        with_action(&|a| a.fill(0)),                      // empty
        with_action(&|a| a[0] = b'E'),                    // upper case
        with_action(&|a| a[1] = b' '),                    // space
        with_action(&|a| a[10] = b'x'),                   // garbage after the NUL
        with_action(&|a| a.copy_from_slice(&[0xc3; 64])), // not UTF-8
    ];
    for b in cases {
        let (raw, _) = Raw::connect(&dir.sock());
        raw.send(&b);
        let d = raw.recv_msg();
        assert_eq!((d.header.req_id, d.header.status), (10, code::EINVAL));
        assert_eq!(d.header.action_name(), Some(wire::ERROR_ACTION));
        still_served(&raw);
    }
}

#[test]
fn wrong_kind_reserved_or_status() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let good = request(11, "echo", &Value::Null);
    for kind in [0u8, Kind::Reply as u8, Kind::Notification as u8, 9] {
        let mut b = good.clone();
        b[6] = kind;
        expect_error_reply(&dir, &b, 11, code::EINVAL);
    }
    let mut b = good.clone();
    b[7] = 1;
    expect_error_reply(&dir, &b, 11, code::EINVAL);
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(-1i32).to_le_bytes());
    expect_error_reply(&dir, &b, 11, code::EINVAL);
}

#[test]
fn primary_survives_all_of_it() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    let (raw, _) = Raw::connect(&dir.sock());
    for len in [0usize, 1, 4, 50, HEADER_SIZE - 1] {
        let (r, _) = Raw::connect(&dir.sock());
        r.send(&vec![0xa5; len]);
        drop(r);
    }
    raw.send(&request(1, "echo", &json!("cut short"))[..HEADER_SIZE + 1]);
    let _ = raw.recv_error();
    let r = s.request_sync("echo", &json!("fine"), &[], LONG).unwrap();
    assert_eq!(r.payload, "fine");
    assert!(p.clients().iter().any(|c| c.client_id == s.client_id()));
}
