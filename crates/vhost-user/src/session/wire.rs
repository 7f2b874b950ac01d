//! The checks and replies every request shares: the protocol feature it needs, the fds
//! attached, the body decoded at its exact size, and the `u64` reply.

use vhost::vhost_user::message::{
    FrontendReq, VhostUserMsgValidator, VhostUserProtocolFeatures, VhostUserU64,
};
use vm_memory::ByteValued;

use super::Session;
use crate::connection::Request;
use crate::error::Error;

pub(super) fn decode<T: ByteValued + Default + VhostUserMsgValidator>(
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

pub(super) fn expect_fds(
    request: &'static str,
    req: &Request,
    expected: usize,
) -> Result<(), Error> {
    if req.fds.len() != expected {
        return Err(Error::WrongFdCount {
            request,
            got: req.fds.len(),
            expected,
        });
    }
    Ok(())
}

pub(super) fn u64_reply(v: u64) -> Vec<u8> {
    VhostUserU64::new(v).as_slice().to_vec()
}

/// Requests whose success reply carries data (they never get a bare ack).
pub(super) fn has_reply(code: FrontendReq) -> bool {
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

impl Session {
    pub(super) fn need(
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
}
