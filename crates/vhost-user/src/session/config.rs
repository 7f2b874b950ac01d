//! Config space: GET_CONFIG, and the backend channel (SET_BACKEND_REQ_FD) over which a
//! config change is announced to the frontend.

use std::sync::Arc;

use uvdpa_runtime::ConfigNotifier;
use vhost::vhost_user::message::{VhostUserConfig, VHOST_USER_CONFIG_SIZE};

use super::wire::decode;
use super::Session;
use crate::error::Error;

/// The backend→frontend channel (SET_BACKEND_REQ_FD), shared with workers so a failing
/// queue can tell the frontend at once.
pub(super) type BackendChannel = Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>;

/// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no body, no reply asked) without blocking:
/// a frontend that does not read its channel loses the notice, it never stalls a worker.
pub(super) fn notify_config_change(channel: &BackendChannel) -> bool {
    let guard = channel.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sock) = guard.as_ref() else {
        return false;
    };
    let code = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG as u32;
    let hdr = crate::connection::Header {
        request: code,
        flags: 0x1,
        size: 0,
    }
    .to_bytes();
    matches!(
        rustix::net::send(sock, &hdr, rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL),
        Ok(n) if n == hdr.len()
    )
}

impl Session {
    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to this session's frontend over the
    /// backend channel (SET_BACKEND_REQ_FD) when called; the call returns whether the
    /// notice went out (false before the frontend set a channel, or when it does not read
    /// it). It never blocks, and stays valid (a no-op) after the session ended.
    pub fn config_notifier(&self) -> ConfigNotifier {
        let channel = self.backend.clone();
        Arc::new(move || notify_config_change(&channel))
    }

    pub(super) fn get_config(&mut self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let hdr_len = std::mem::size_of::<VhostUserConfig>();
        let (head, payload) = body.split_at(hdr_len.min(body.len()));
        let c: VhostUserConfig = decode("GET_CONFIG", head)?;
        let size = c.size as usize;
        if payload.len() != size || c.offset.saturating_add(c.size) > VHOST_USER_CONFIG_SIZE {
            return Err(Error::BadBodySize {
                request: "GET_CONFIG",
                got: body.len(),
                expected: hdr_len + size,
            });
        }
        let config = self.rt.device().config();
        let mut reply = Vec::with_capacity(hdr_len + size);
        reply.extend_from_slice(head);
        let start = c.offset as usize;
        for k in 0..size {
            reply.push(config.get(start + k).copied().unwrap_or(0));
        }
        Ok(reply)
    }
}
