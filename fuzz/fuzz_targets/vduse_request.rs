//! VDUSE device-fd messages (`uvdpa_vduse::message`): arbitrary bytes as a request read
//! from `/dev/vduse/NAME` and as a response, as the kernel would see one.
//!
//! Input layout: the raw bytes of one message (a well-formed request is 152 bytes, see
//! `fuzz/seeds/vduse_request`). Checked, beyond "no panic":
//! - `Request::parse` accepts exactly the 152-byte inputs, except VDUSE_UPDATE_IOTLB with
//!   `start > last`; what it accepts re-encodes to bytes that parse to the same request,
//!   with the type, id and the fields of its kind at the uapi offsets of the input;
//! - `Response::parse` (no payload, split, packed) accepts only 152-byte inputs with zero
//!   reserved words and a known result; what it accepts re-encodes to bytes that parse to
//!   the same response.

#![no_main]

use libfuzzer_sys::fuzz_target;
use uvdpa_vduse::message::{Request, RequestKind, Response, RingLayout};
use uvdpa_vduse::sys::{REQUEST_SIZE, RESPONSE_SIZE};

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    match Request::parse(data) {
        Ok(r) => {
            assert_eq!(data.len(), REQUEST_SIZE);
            assert_eq!(r.request_id, u32_at(data, 4));
            let ty = u32_at(data, 0);
            match r.kind {
                RequestKind::GetVqState { index } => {
                    assert_eq!(ty, 0);
                    assert_eq!(index, u32_at(data, 24));
                }
                RequestKind::SetStatus { status } => {
                    assert_eq!(ty, 1);
                    assert_eq!(status, data[24]);
                }
                RequestKind::UpdateIotlb { start, last } => {
                    assert_eq!(ty, 2);
                    assert_eq!((start, last), (u64_at(data, 24), u64_at(data, 32)));
                    assert!(start <= last);
                }
                RequestKind::Unknown { ty: t } => {
                    assert!(t > 2);
                    assert_eq!(t, ty);
                }
            }
            assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
        }
        Err(_) => {
            let iotlb_inverted = data.len() == REQUEST_SIZE
                && u32_at(data, 0) == 2
                && u64_at(data, 24) > u64_at(data, 32);
            assert!(data.len() != REQUEST_SIZE || iotlb_inverted);
        }
    }
    for layout in [None, Some(RingLayout::Split), Some(RingLayout::Packed)] {
        if let Ok(resp) = Response::parse(data, layout) {
            assert_eq!(data.len(), RESPONSE_SIZE);
            assert!(data[8..24].iter().all(|&b| b == 0));
            assert!(u32_at(data, 4) <= 1);
            assert_eq!(resp.vq_state.is_some(), layout.is_some());
            assert_eq!(Response::parse(&resp.to_bytes(), layout), Ok(resp));
        }
    }
});
