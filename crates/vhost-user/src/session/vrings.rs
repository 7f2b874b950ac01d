//! Vring requests outside the dispatch: the index check every vring request makes, and
//! SET_VRING_KICK, SET_VRING_CALL and SET_VRING_ERR (the ones that carry an fd).

use std::sync::Arc;

use uvdpa_virtio::interrupts::IrqAction;
use vhost::vhost_user::message::{FrontendReq, VhostUserU64};

use super::wire::{decode, expect_fds};
use super::Session;
use crate::connection::Request;
use crate::error::Error;

impl Session {
    pub(super) fn vring_index(&self, index: u32) -> Result<usize, Error> {
        let i = index as usize;
        if i < self.rt.num_vrings() {
            Ok(i)
        } else {
            Err(Error::VringIndex {
                index,
                num: self.rt.device().num_queues(),
            })
        }
    }

    pub(super) fn set_vring_fd(&mut self, code: FrontendReq, req: &Request) -> Result<(), Error> {
        let name = match code {
            FrontendReq::SET_VRING_KICK => "SET_VRING_KICK",
            FrontendReq::SET_VRING_CALL => "SET_VRING_CALL",
            _ => "SET_VRING_ERR",
        };
        let v: VhostUserU64 = decode(name, &req.body)?;
        let value = v.value;
        const NOFD: u64 = 0x100;
        if value & !(NOFD | 0xff) != 0 {
            return Err(Error::InvalidParam {
                request: name,
                reason: format!("value {value:#x} has reserved bits"),
            });
        }
        let i = self.vring_index((value & 0xff) as u32)?;
        let nofd = value & NOFD != 0;
        expect_fds(name, req, usize::from(!nofd))?;
        let fd = req
            .fds
            .first()
            .and_then(|f| f.try_clone().ok())
            .map(Arc::new);
        if !nofd && fd.is_none() {
            return Err(Error::Worker {
                index: i as u16,
                reason: "cannot duplicate the fd".into(),
            });
        }
        match code {
            FrontendReq::SET_VRING_KICK => Ok(self.rt.reconfigure(i, |v| {
                // A kick fd starts the ring; without one the frontend would poll, which
                // this backend does not support, so the ring stays stopped.
                v.started = fd.is_some();
                v.kick = fd;
            })?),
            FrontendReq::SET_VRING_CALL => {
                // The call fd is the trigger of the vring's vector: swapped in place, the
                // worker keeps running (QEMU re-sends it when the guest masks a vector).
                self.rt
                    .vectors()
                    .set_irqs(i as u16, 1, IrqAction::Eventfd(vec![fd]))
                    .map_err(|e| Error::InvalidParam {
                        request: "SET_VRING_CALL",
                        reason: e.to_string(),
                    })
            }
            _ => Ok(self.rt.reconfigure(i, |v| v.err = fd)?),
        }
    }
}
