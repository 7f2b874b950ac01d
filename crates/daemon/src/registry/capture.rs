//! Live captures (`uvdpa dev capture`): attaching a capture ring to a device's queues for
//! an IPC client, and detaching it when the client goes or the device is deleted.

use super::*;

/// A live capture attached by an IPC client (`uvdpa dev capture`), kept until the client
/// disconnects or the device goes.
pub(super) struct ActiveCapture {
    device: String,
    point: Arc<CapturePoint>,
    /// Listed by `res show capture` while attached.
    entry: ResHandle,
}

/// Default snaplen of `dev capture` (tcpdump's).
pub const CAPTURE_DEFAULT_SNAPLEN: u32 = 262_144;
/// Capture memory for all sub-rings together, before rounding each down to a power of
/// two within [`CAPTURE_MIN_RING`]..=[`CAPTURE_MAX_RING`].
const CAPTURE_BUDGET: u64 = 16 << 20;
const CAPTURE_MIN_RING: u64 = 1 << 20;
const CAPTURE_MAX_RING: u64 = 8 << 20;

impl Registry {
    fn captures(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ActiveCapture>> {
        self.captures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a live capture of device `name` for IPC client `client` (process `pid`):
    /// virtqueue `qidx` only, or every data queue. A net device mirrors its frames, cut at
    /// `snaplen` bytes; a blk device writes one request trace record per completed request
    /// (`uvdpa_devices::blk::trace`, `snaplen` is ignored). Returns what was attached and
    /// the ring's memfd. The capture lasts until [`Registry::capture_stop`] for that client
    /// (its connection closed) or the device is deleted.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`] for a queue out of range,
    /// [`RegistryError::Capture`] for the control queue, a bad snaplen or no memory,
    /// [`RegistryError::CaptureBusy`] when the device or the client already has a
    /// capture.
    pub fn capture_start(
        &self,
        name: &str,
        qidx: Option<u32>,
        snaplen: u32,
        client: u64,
        pid: i32,
    ) -> Result<(CaptureView, OwnedFd), RegistryError> {
        let err = |reason: String| RegistryError::Capture {
            name: name.into(),
            reason,
        };
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let no_queue = |q: u32| RegistryError::NoQueue {
            name: name.into(),
            qidx: q,
            queues: m.spec.num_queues(),
        };
        // net: one sub-ring per queue pair, frames cut at snaplen; blk: one sub-ring per
        // queue, fixed-size request records.
        let (mgmtdev, point, queues, all_rings, snaplen) = match &m.dev {
            Dev::Net(spec, net) => {
                let pairs = spec.config.max_queue_pairs;
                let data_queues = 2 * u32::from(pairs);
                let queues: Vec<u16> = match qidx {
                    None => (0..2 * pairs).collect(),
                    Some(q) if q < data_queues => vec![q as u16],
                    Some(q) if q == data_queues => {
                        return Err(err(format!("queue {q} is the control queue")))
                    }
                    Some(q) => return Err(no_queue(q)),
                };
                let point = net.capture_point().clone();
                ("net", point, queues, u32::from(pairs), snaplen)
            }
            Dev::Blk(cfg, blk) => {
                let queues: Vec<u16> = match qidx {
                    None => (0..cfg.num_queues).collect(),
                    Some(q) if q < u32::from(cfg.num_queues) => vec![q as u16],
                    Some(q) => return Err(no_queue(q)),
                };
                let point = blk.trace_point().clone();
                let rec = blk_trace::RECORD_LEN as u32;
                ("blk", point, queues, u32::from(cfg.num_queues), rec)
            }
        };
        let mut caps = self.captures();
        if let Some(c) = caps.get(&client) {
            return Err(RegistryError::CaptureBusy {
                name: name.into(),
                reason: format!("this client already captures {}", c.device),
            });
        }
        let rings = if qidx.is_some() { 1 } else { all_rings };
        let per_ring =
            (CAPTURE_BUDGET / u64::from(rings)).clamp(CAPTURE_MIN_RING, CAPTURE_MAX_RING);
        let ring_size = 1u64 << (63 - per_ring.leading_zeros());
        let ring =
            CaptureRing::new(name, rings, ring_size, snaplen).map_err(|e| err(error_chain(&e)))?;
        let fd = ring
            .fd()
            .try_clone_to_owned()
            .map_err(|e| err(format!("cannot duplicate the ring's fd: {e}")))?;
        match point.attach(Arc::new(ring), qidx.map(|q| q as u16)) {
            Ok(()) => {}
            Err(CaptureError::Busy) => {
                let holder = caps
                    .values()
                    .find(|c| c.device == name)
                    .map(|c| format!(" (by {})", c.entry.id()))
                    .unwrap_or_default();
                return Err(RegistryError::CaptureBusy {
                    name: name.into(),
                    reason: format!("a capture is already attached{holder}"),
                });
            }
            Err(e) => return Err(err(error_chain(&e))),
        }
        let res_name = match qidx {
            Some(q) => format!("{name}-q{q}"),
            None => name.to_string(),
        };
        let entry = self.tracker.create(
            ResType::Capture,
            res_name,
            Some(m.entry.id()),
            Owner::of_pid(u32::try_from(pid).unwrap_or(0)),
        );
        entry.add();
        let view = CaptureView {
            name: name.into(),
            mgmtdev: mgmtdev.into(),
            queues,
            rings,
            ring_size,
            snaplen,
            res: entry.id().to_string(),
        };
        info!(device = name, client, pid, queues = ?view.queues, "capture attached");
        caps.insert(
            client,
            ActiveCapture {
                device: name.into(),
                point,
                entry,
            },
        );
        Ok((view, fd))
    }

    /// Detaches the capture of IPC client `client`, if it has one (its connection
    /// closed). Returns whether it had one.
    pub fn capture_stop(&self, client: u64) -> bool {
        let Some(c) = self.captures().remove(&client) else {
            return false;
        };
        c.point.detach();
        info!(device = %c.device, client, "capture detached");
        let _ = c.entry.del(Duration::ZERO);
        true
    }

    /// Detaches the captures of device `name` (it is being deleted).
    pub(super) fn capture_stop_device(&self, name: &str) {
        let gone: Vec<ActiveCapture> = {
            let mut caps = self.captures();
            let ids: Vec<u64> = caps
                .iter()
                .filter(|(_, c)| c.device == name)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| caps.remove(&id)).collect()
        };
        for c in gone {
            c.point.detach();
            let _ = c.entry.del(Duration::ZERO);
        }
    }
}
