//! The messages of the VDUSE device fd (`vduse.rst`, "Control messages"): requests the
//! kernel sends with read(2), responses the daemon sends with write(2).
//!
//! Pure byte handling, no I/O and no `unsafe`: [`Request::parse`] turns the 152 bytes of
//! a `struct vduse_dev_request` into a typed [`Request`] (never panicking, whatever the
//! bytes), and [`Response::to_bytes`] builds a `struct vduse_dev_response`. The reverse
//! directions ([`Request::to_bytes`], [`Response::parse`]) exist for tests and fakes that
//! play the kernel's part. Integers are in native byte order, as the kernel copies the
//! structs.
//!
//! What to answer to each request is not decided here (that is the transport's policy).

use thiserror::Error;

use crate::sys::{
    REQUEST_SIZE, RESPONSE_SIZE, VDUSE_GET_VQ_STATE, VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK,
    VDUSE_SET_STATUS, VDUSE_UPDATE_IOTLB,
};

/// Errors from parsing a message.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MessageError {
    /// The message is not exactly the struct's size.
    #[error("VDUSE message of {got} bytes, expected {expected}")]
    Length {
        /// Bytes received.
        got: usize,
        /// The struct's size.
        expected: usize,
    },
    /// VDUSE_UPDATE_IOTLB with `start > last`.
    #[error("VDUSE_UPDATE_IOTLB range {start:#x}..={last:#x} is empty")]
    IotlbRange {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// A response whose reserved words are not zero (the kernel refuses it).
    #[error("VDUSE response has non-zero reserved words")]
    Reserved,
    /// A response whose result is neither OK nor FAILED.
    #[error("VDUSE response result {result} is neither OK (0) nor FAILED (1)")]
    Result {
        /// The result word.
        result: u32,
    },
    /// A packed ring state with a wrap counter above 1 or a position above 15 bits.
    #[error("Packed virtqueue state out of range: {words:?}")]
    PackedState {
        /// The four state words as sent.
        words: [u16; 4],
    },
}

/// Offsets in `struct vduse_dev_request` / `struct vduse_dev_response`.
const OFF_TYPE: usize = 0;
const OFF_REQUEST_ID: usize = 4;
const OFF_RESP_ID: usize = 0;
const OFF_RESULT: usize = 4;
const OFF_RESERVED: usize = 8;
const OFF_PAYLOAD: usize = 24;
/// In the payload: `vq_state.index`, then its state union; `iova.start`, `iova.last`.
const OFF_VQ_INDEX: usize = OFF_PAYLOAD;
const OFF_VQ_STATE: usize = OFF_PAYLOAD + 4;
const OFF_IOVA_START: usize = OFF_PAYLOAD;
const OFF_IOVA_LAST: usize = OFF_PAYLOAD + 8;

const _: () = assert!(std::mem::offset_of!(crate::sys::VduseDevRequest, payload) == OFF_PAYLOAD);
const _: () = assert!(std::mem::offset_of!(crate::sys::VduseVqState, state) == 4);

fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(off..off + N) {
        out.copy_from_slice(src);
    }
    out
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes(get(b, off))
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(get(b, off))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(get(b, off))
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(dst) = b.get_mut(off..off + v.len()) {
        dst.copy_from_slice(v);
    }
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VDUSE_GET_VQ_STATE: report the ring state of queue `index` (answer with
    /// [`Response::vq_state_split`] or [`Response::vq_state_packed`]). The index is as
    /// sent; the caller checks it against its queue count.
    GetVqState {
        /// Virtqueue index.
        index: u32,
    },
    /// VDUSE_SET_STATUS: the driver wrote `status` (virtio 1.2 §2.1; 0 is a reset).
    SetStatus {
        /// The device status byte.
        status: u8,
    },
    /// VDUSE_UPDATE_IOTLB: mappings in the IOVA range `[start, last]` changed; drop what
    /// was mapped there and fetch again with VDUSE_IOTLB_GET_FD. `start <= last`.
    UpdateIotlb {
        /// First IOVA.
        start: u64,
        /// Last IOVA, inclusive.
        last: u64,
    },
    /// A type this API version does not define (answer FAILED).
    Unknown {
        /// The request type word.
        ty: u32,
    },
}

/// A request read from the device fd (`struct vduse_dev_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Identifier to echo in the response.
    pub request_id: u32,
    /// What is asked.
    pub kind: RequestKind,
}

impl Request {
    /// Parses the bytes of one request.
    ///
    /// Reserved words and unused payload bytes are ignored (the kernel zeroes them).
    ///
    /// # Errors
    /// [`MessageError::Length`] unless `bytes` is exactly [`REQUEST_SIZE`] long;
    /// [`MessageError::IotlbRange`] for VDUSE_UPDATE_IOTLB with `start > last`.
    pub fn parse(bytes: &[u8]) -> Result<Self, MessageError> {
        if bytes.len() != REQUEST_SIZE {
            return Err(MessageError::Length {
                got: bytes.len(),
                expected: REQUEST_SIZE,
            });
        }
        let request_id = get_u32(bytes, OFF_REQUEST_ID);
        let kind = match get_u32(bytes, OFF_TYPE) {
            VDUSE_GET_VQ_STATE => RequestKind::GetVqState {
                index: get_u32(bytes, OFF_VQ_INDEX),
            },
            VDUSE_SET_STATUS => RequestKind::SetStatus {
                status: get::<1>(bytes, OFF_PAYLOAD)[0],
            },
            VDUSE_UPDATE_IOTLB => {
                let start = get_u64(bytes, OFF_IOVA_START);
                let last = get_u64(bytes, OFF_IOVA_LAST);
                if start > last {
                    return Err(MessageError::IotlbRange { start, last });
                }
                RequestKind::UpdateIotlb { start, last }
            }
            ty => RequestKind::Unknown { ty },
        };
        Ok(Self { request_id, kind })
    }

    /// The request's bytes as the kernel would send them (for tests and fakes). An
    /// [`RequestKind::Unknown`] has an all-zero payload.
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        put(&mut b, OFF_REQUEST_ID, &self.request_id.to_ne_bytes());
        let ty = match self.kind {
            RequestKind::GetVqState { index } => {
                put(&mut b, OFF_VQ_INDEX, &index.to_ne_bytes());
                VDUSE_GET_VQ_STATE
            }
            RequestKind::SetStatus { status } => {
                put(&mut b, OFF_PAYLOAD, &[status]);
                VDUSE_SET_STATUS
            }
            RequestKind::UpdateIotlb { start, last } => {
                put(&mut b, OFF_IOVA_START, &start.to_ne_bytes());
                put(&mut b, OFF_IOVA_LAST, &last.to_ne_bytes());
                VDUSE_UPDATE_IOTLB
            }
            RequestKind::Unknown { ty } => ty,
        };
        put(&mut b, OFF_TYPE, &ty.to_ne_bytes());
        b
    }
}

/// Ring state of a packed virtqueue (virtio 1.2 §2.8), as VDUSE carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackedVqState {
    /// Driver ring wrap counter the device last observed.
    pub last_avail_counter: bool,
    /// Device's next available position, 15 bits.
    pub last_avail_idx: u16,
    /// Device ring wrap counter.
    pub last_used_counter: bool,
    /// Device's next used position, 15 bits.
    pub last_used_idx: u16,
}

/// Ring state of a virtqueue: split or packed, per VIRTIO_F_RING_PACKED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqState {
    /// Split ring (virtio 1.2 §2.7): the device's next available index.
    Split {
        /// Next available index.
        avail_index: u16,
    },
    /// Packed ring (virtio 1.2 §2.8).
    Packed(PackedVqState),
}

/// Which ring layout a state union holds (the kernel decides by VIRTIO_F_RING_PACKED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLayout {
    /// Split virtqueue.
    Split,
    /// Packed virtqueue.
    Packed,
}

impl VqState {
    /// The layout of this state.
    pub fn layout(&self) -> RingLayout {
        match self {
            Self::Split { .. } => RingLayout::Split,
            Self::Packed(_) => RingLayout::Packed,
        }
    }

    /// The four `u16` words of the state union (`vduse_vq_state_split` uses the first).
    pub fn to_words(&self) -> [u16; 4] {
        match *self {
            Self::Split { avail_index } => [avail_index, 0, 0, 0],
            Self::Packed(p) => [
                u16::from(p.last_avail_counter),
                p.last_avail_idx,
                u16::from(p.last_used_counter),
                p.last_used_idx,
            ],
        }
    }

    /// Decodes the state union's words as `layout`.
    ///
    /// # Errors
    /// [`MessageError::PackedState`] for a packed state whose counters are above 1 or
    /// whose positions use bit 15.
    pub fn from_words(words: [u16; 4], layout: RingLayout) -> Result<Self, MessageError> {
        match layout {
            RingLayout::Split => Ok(Self::Split {
                avail_index: words[0],
            }),
            RingLayout::Packed => {
                let [ac, ai, uc, ui] = words;
                if ac > 1 || uc > 1 || ai > 0x7fff || ui > 0x7fff {
                    return Err(MessageError::PackedState { words });
                }
                Ok(Self::Packed(PackedVqState {
                    last_avail_counter: ac == 1,
                    last_avail_idx: ai,
                    last_used_counter: uc == 1,
                    last_used_idx: ui,
                }))
            }
        }
    }
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseResult {
    /// VDUSE_REQ_RESULT_OK.
    Ok,
    /// VDUSE_REQ_RESULT_FAILED (the kernel turns it into -EIO for the driver).
    Failed,
}

/// The state part of an answer to VDUSE_GET_VQ_STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VqStateReply {
    /// Virtqueue index.
    pub index: u32,
    /// Its state.
    pub state: VqState,
}

/// A response written to the device fd (`struct vduse_dev_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's identifier.
    pub request_id: u32,
    /// Outcome.
    pub result: ResponseResult,
    /// Ring state, for an answer to VDUSE_GET_VQ_STATE.
    pub vq_state: Option<VqStateReply>,
}

impl Response {
    /// Success, no payload (SET_STATUS, UPDATE_IOTLB).
    pub fn ok(request_id: u32) -> Self {
        Self {
            request_id,
            result: ResponseResult::Ok,
            vq_state: None,
        }
    }

    /// Failure, no payload.
    pub fn failed(request_id: u32) -> Self {
        Self {
            request_id,
            result: ResponseResult::Failed,
            vq_state: None,
        }
    }

    /// Success with a split ring's state (GET_VQ_STATE without VIRTIO_F_RING_PACKED).
    pub fn vq_state_split(request_id: u32, index: u32, avail_index: u16) -> Self {
        Self {
            request_id,
            result: ResponseResult::Ok,
            vq_state: Some(VqStateReply {
                index,
                state: VqState::Split { avail_index },
            }),
        }
    }

    /// Success with a packed ring's state (GET_VQ_STATE with VIRTIO_F_RING_PACKED).
    /// Positions are 15-bit; bit 15 is cleared, as the kernel would ignore it.
    pub fn vq_state_packed(
        request_id: u32,
        index: u32,
        last_avail_counter: bool,
        last_avail_idx: u16,
        last_used_counter: bool,
        last_used_idx: u16,
    ) -> Self {
        Self {
            request_id,
            result: ResponseResult::Ok,
            vq_state: Some(VqStateReply {
                index,
                state: VqState::Packed(PackedVqState {
                    last_avail_counter,
                    last_avail_idx: last_avail_idx & 0x7fff,
                    last_used_counter,
                    last_used_idx: last_used_idx & 0x7fff,
                }),
            }),
        }
    }

    /// The response's bytes, reserved words and unused payload zero.
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        put(&mut b, OFF_RESP_ID, &self.request_id.to_ne_bytes());
        let result = match self.result {
            ResponseResult::Ok => VDUSE_REQ_RESULT_OK,
            ResponseResult::Failed => VDUSE_REQ_RESULT_FAILED,
        };
        put(&mut b, OFF_RESULT, &result.to_ne_bytes());
        if let Some(s) = self.vq_state {
            put(&mut b, OFF_VQ_INDEX, &s.index.to_ne_bytes());
            for (i, w) in s.state.to_words().iter().enumerate() {
                put(&mut b, OFF_VQ_STATE + 2 * i, &w.to_ne_bytes());
            }
        }
        b
    }

    /// Parses a response as the kernel would (for tests and fakes): `vq_state` says
    /// whether the request was GET_VQ_STATE and which layout the ring has; without it the
    /// payload is ignored.
    ///
    /// # Errors
    /// [`MessageError::Length`] unless exactly [`RESPONSE_SIZE`] bytes;
    /// [`MessageError::Reserved`] if a reserved word is not zero;
    /// [`MessageError::Result`] for an unknown result; [`MessageError::PackedState`] as
    /// [`VqState::from_words`].
    pub fn parse(bytes: &[u8], vq_state: Option<RingLayout>) -> Result<Self, MessageError> {
        if bytes.len() != RESPONSE_SIZE {
            return Err(MessageError::Length {
                got: bytes.len(),
                expected: RESPONSE_SIZE,
            });
        }
        if bytes
            .get(OFF_RESERVED..OFF_PAYLOAD)
            .is_some_and(|r| r.iter().any(|&x| x != 0))
        {
            return Err(MessageError::Reserved);
        }
        let result = match get_u32(bytes, OFF_RESULT) {
            VDUSE_REQ_RESULT_OK => ResponseResult::Ok,
            VDUSE_REQ_RESULT_FAILED => ResponseResult::Failed,
            result => return Err(MessageError::Result { result }),
        };
        let vq_state = match vq_state {
            None => None,
            Some(layout) => {
                let words = std::array::from_fn(|i| get_u16(bytes, OFF_VQ_STATE + 2 * i));
                Some(VqStateReply {
                    index: get_u32(bytes, OFF_VQ_INDEX),
                    state: VqState::from_words(words, layout)?,
                })
            }
        };
        Ok(Self {
            request_id: get_u32(bytes, OFF_RESP_ID),
            result,
            vq_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sys::{VduseDevRequest, VduseDevRequestPayload, VduseIovaRange};

    #[test]
    fn parses_each_request_type() {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&2u32.to_ne_bytes());
        b[4..8].copy_from_slice(&77u32.to_ne_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[32..40].copy_from_slice(&0x1fffu64.to_ne_bytes());
        assert_eq!(
            Request::parse(&b).unwrap(),
            Request {
                request_id: 77,
                kind: RequestKind::UpdateIotlb {
                    start: 0x1000,
                    last: 0x1fff
                }
            }
        );
        b[0..4].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(
            Request::parse(&b).unwrap().kind,
            RequestKind::SetStatus { status: 0 }
        );
        b[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(
            Request::parse(&b).unwrap().kind,
            RequestKind::GetVqState { index: 0x1000 }
        );
        b[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(
            Request::parse(&b).unwrap().kind,
            RequestKind::Unknown { ty: 3 }
        );
    }

    #[test]
    fn matches_the_repr_c_struct() {
        // The byte offsets used here agree with the sys struct's layout.
        let mut req = VduseDevRequest {
            ty: VDUSE_UPDATE_IOTLB,
            request_id: 5,
            reserved: [0; 4],
            payload: VduseDevRequestPayload { padding: [0; 32] },
        };
        req.payload.iova = VduseIovaRange {
            start: 0x10,
            last: 0x20,
        };
        // SAFETY: VduseDevRequest is repr(C), 152 bytes of integers without implicit
        // padding, and every byte was initialised (the payload through `padding` first);
        // the slice borrows `req` and is dropped before it.
        let bytes = unsafe {
            std::slice::from_raw_parts((&req as *const VduseDevRequest).cast::<u8>(), REQUEST_SIZE)
        };
        let want = Request {
            request_id: 5,
            kind: RequestKind::UpdateIotlb {
                start: 0x10,
                last: 0x20,
            },
        };
        assert_eq!(Request::parse(bytes), Ok(want));
        assert_eq!(bytes, &want.to_bytes()[..]);
    }

    #[test]
    fn refuses_wrong_lengths_and_empty_ranges() {
        assert_eq!(
            Request::parse(&[0u8; 151]),
            Err(MessageError::Length {
                got: 151,
                expected: 152
            })
        );
        assert!(Request::parse(&[0u8; 153]).is_err());
        assert!(Request::parse(&[]).is_err());
        let bad = Request {
            request_id: 1,
            kind: RequestKind::UpdateIotlb { start: 2, last: 1 },
        }
        .to_bytes();
        assert_eq!(
            Request::parse(&bad),
            Err(MessageError::IotlbRange { start: 2, last: 1 })
        );
    }

    #[test]
    fn responses_have_the_kernel_layout() {
        let b = Response::vq_state_packed(9, 3, true, 0x8005, false, 7).to_bytes();
        assert_eq!(&b[0..4], &9u32.to_ne_bytes());
        assert_eq!(&b[4..8], &0u32.to_ne_bytes());
        assert!(b[8..24].iter().all(|&x| x == 0));
        assert_eq!(&b[24..28], &3u32.to_ne_bytes());
        assert_eq!(&b[28..30], &1u16.to_ne_bytes());
        assert_eq!(&b[30..32], &5u16.to_ne_bytes());
        assert_eq!(&b[32..34], &0u16.to_ne_bytes());
        assert_eq!(&b[34..36], &7u16.to_ne_bytes());
        assert!(b[36..].iter().all(|&x| x == 0));
        let f = Response::failed(4).to_bytes();
        assert_eq!(&f[4..8], &1u32.to_ne_bytes());
        let s = Response::vq_state_split(1, 2, 0xabcd).to_bytes();
        assert_eq!(&s[28..30], &0xabcdu16.to_ne_bytes());
        assert!(s[30..].iter().all(|&x| x == 0));
    }

    #[test]
    fn response_parse_checks_reserved_result_and_state() {
        let mut b = Response::ok(1).to_bytes();
        b[10] = 1;
        assert_eq!(Response::parse(&b, None), Err(MessageError::Reserved));
        let mut b = Response::ok(1).to_bytes();
        b[4] = 2;
        assert_eq!(
            Response::parse(&b, None),
            Err(MessageError::Result { result: 2 })
        );
        let mut b = Response::vq_state_split(1, 0, 0).to_bytes();
        b[28] = 2;
        assert!(Response::parse(&b, Some(RingLayout::Packed)).is_err());
        assert!(Response::parse(&b[..100], None).is_err());
    }

    fn request_kind() -> impl Strategy<Value = RequestKind> {
        prop_oneof![
            any::<u32>().prop_map(|index| RequestKind::GetVqState { index }),
            any::<u8>().prop_map(|status| RequestKind::SetStatus { status }),
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| RequestKind::UpdateIotlb {
                start: a.min(b),
                last: a.max(b)
            }),
            (3u32..).prop_map(|ty| RequestKind::Unknown { ty }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            any::<u32>().prop_map(Response::ok),
            any::<u32>().prop_map(Response::failed),
            (any::<u32>(), any::<u32>(), any::<u16>())
                .prop_map(|(id, i, a)| Response::vq_state_split(id, i, a)),
            (
                any::<u32>(),
                any::<u32>(),
                any::<bool>(),
                any::<u16>(),
                any::<bool>(),
                any::<u16>()
            )
                .prop_map(|(id, i, ac, ai, uc, ui)| Response::vq_state_packed(
                    id, i, ac, ai, uc, ui
                )),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Request::parse(&bytes);
            let _ = Response::parse(&bytes, None);
            let _ = Response::parse(&bytes, Some(RingLayout::Split));
            let _ = Response::parse(&bytes, Some(RingLayout::Packed));
        }

        #[test]
        fn request_size_bytes_parse_and_reencode(bytes in proptest::collection::vec(any::<u8>(), REQUEST_SIZE)) {
            if let Ok(r) = Request::parse(&bytes) {
                // What was parsed survives a round trip through the canonical encoding.
                prop_assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
            }
        }

        #[test]
        fn requests_round_trip(id in any::<u32>(), kind in request_kind()) {
            let r = Request { request_id: id, kind };
            prop_assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
        }

        #[test]
        fn responses_round_trip(r in response()) {
            let layout = r.vq_state.map(|s| s.state.layout());
            prop_assert_eq!(Response::parse(&r.to_bytes(), layout), Ok(r));
        }
    }
}
