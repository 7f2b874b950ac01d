//! Inflight tracking: the geometry check of GET_INFLIGHT_FD and SET_INFLIGHT_FD, and the
//! buffer GET_INFLIGHT_FD creates.

use std::sync::Arc;

use uvdpa_virtio::inflight::{InflightLayout, InflightMap};
use uvdpa_virtio::split::MAX_QUEUE_SIZE;
use uvdpa_virtio::VirtioFeatures;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};

use super::wire::{decode, expect_fds};
use super::Session;
use crate::connection::Request;
use crate::error::Error;

impl Session {
    pub(super) fn check_inflight_geometry(
        &self,
        request: &'static str,
        m: &VhostUserInflight,
    ) -> Result<(), Error> {
        let (nq, qs) = (m.num_queues, m.queue_size);
        // Any ring size a frontend may set (see SET_VRING_NUM), whatever the device's
        // queue_size: the region is at most 64 queues of 32768 descriptors.
        if nq == 0 || nq > self.rt.device().num_queues() || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(Error::InvalidParam {
                request,
                reason: format!(
                    "{nq} queues of {qs} (device: 1..={} queues of 1..={MAX_QUEUE_SIZE})",
                    self.rt.device().num_queues(),
                ),
            });
        }
        Ok(())
    }

    pub(super) fn get_inflight_fd(&mut self, req: &Request) -> Result<Arc<InflightMap>, Error> {
        self.need(
            "GET_INFLIGHT_FD",
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            "INFLIGHT_SHMFD",
        )?;
        expect_fds("GET_INFLIGHT_FD", req, 0)?;
        let m: VhostUserInflight = decode("GET_INFLIGHT_FD", &req.body)?;
        self.check_inflight_geometry("GET_INFLIGHT_FD", &m)?;
        // The region follows the ring layout the features negotiated: QEMU sends
        // SET_FEATURES first (vhost_dev_prepare_inflight). A frontend asking before
        // SET_FEATURES gets the packed size, the larger, which serves either layout.
        let acked = self.rt.acked();
        let layout = if acked.is_empty() || acked.contains(VirtioFeatures::VIRTIO_F_RING_PACKED) {
            InflightLayout::Packed
        } else {
            InflightLayout::Split
        };
        let map = InflightMap::create_in(layout, m.num_queues, m.queue_size)
            .map_err(|e| Error::Device(e.to_string()))?;
        self.rt.set_inflight(Some(map.clone()))?;
        Ok(map)
    }
}
