//! Worker groups and vring start/stop: the groups of a device's features, stopping a
//! vring's group (the base it stopped at, a stuck or panicked worker), whether a vring is
//! ready, starting a group's worker (its queues and its error handler), and the resource
//! entries of a running vring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, error, info, warn};
use uvdpa_restrack::{Owner, ResHandle, ResType};
use uvdpa_virtio::dirty::QueueLog;
use uvdpa_virtio::stats::QueueStatsRef;
use uvdpa_virtio::worker::{
    GroupHandler, QueueWorker, StopError, WorkerError, WorkerParams, WorkerQueue,
};
use uvdpa_virtio::{DeviceStatus, VirtioDevice, VirtioFeatures, Virtqueue, VringConfig};

use super::{DeviceRuntime, VringState, STOP_TIMEOUT};
use crate::error::RuntimeError;

/// The vrings one worker runs together.
#[derive(Default)]
pub(super) struct Group {
    worker: Option<QueueWorker>,
    /// Kept between runs (reconnects and restarts reuse it).
    handler: Option<Box<dyn GroupHandler>>,
    /// Vring indices of the group, ascending.
    members: Vec<usize>,
}

/// The device's worker groups for `features`, and the group of each vring. Group ids are
/// the device's, clamped into range (an out-of-range id runs alone).
pub(super) fn queue_groups(
    device: &dyn VirtioDevice,
    features: VirtioFeatures,
) -> (Vec<Group>, Vec<usize>) {
    let n = device.num_queues();
    let group_of: Vec<usize> = (0..n)
        .map(|i| match device.queue_group(i, features) {
            g if g < n => usize::from(g),
            _ => usize::from(i),
        })
        .collect();
    let mut groups: Vec<Group> = (0..n).map(|_| Group::default()).collect();
    for (i, &g) in group_of.iter().enumerate() {
        groups[g].members.push(i);
    }
    (groups, group_of)
}

impl DeviceRuntime {
    /// Stops vring `i` if it runs, applies `change`, and starts it if it should run.
    ///
    /// # Errors
    /// A ring that cannot start.
    pub fn reconfigure(
        &mut self,
        i: usize,
        change: impl FnOnce(&mut VringState),
    ) -> Result<(), RuntimeError> {
        self.stop_vring(i);
        if let Some(v) = self.vrings.get_mut(i) {
            change(v);
        }
        self.update_vring(i)
    }

    /// Stops every running vring (so a change to what workers use can be applied) and
    /// returns their indices, for [`DeviceRuntime::update_vring`] to start them again.
    pub fn stop_running_vrings(&mut self) -> Vec<usize> {
        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].running)
            .collect();
        for &i in &running {
            self.stop_vring(i);
        }
        running
    }

    /// Stops vring `i`'s group (chains not yet popped stay in the avail ring); its base is
    /// where the worker stopped.
    pub fn stop_vring(&mut self, i: usize) {
        self.stop_vring_with(i, false);
    }

    /// Stops vring `i`'s group; with `drain`, chains already in the avail rings are
    /// completed first.
    pub(super) fn stop_vring_with(&mut self, i: usize, drain: bool) {
        let Some(&g) = self.group_of.get(i) else {
            return;
        };
        let Some(worker) = self.groups[g].worker.take() else {
            return;
        };
        let stopped = worker.stop_timeout(drain, STOP_TIMEOUT);
        for &m in &self.groups[g].members {
            let v = &mut self.vrings[m];
            v.tracked.clear();
            v.running = false;
        }
        match stopped {
            Ok(exit) => {
                for q in &exit.queues {
                    if let Some(v) = self.vrings.get_mut(usize::from(q.index)) {
                        v.base = q.queue.next_avail();
                        v.base_set = true;
                    }
                }
                self.groups[g].handler = Some(exit.handler);
                if let Some(e) = exit.error {
                    debug!(device = %self.name, vring = i, "stopped after error: {e}");
                }
            }
            Err(StopError::Stuck(_)) => {
                // An unresponsive backend must not hang the driver (seed 004): the ring is
                // abandoned (its worker will not touch it again) and the device needs a
                // reset. The handler went with the stuck worker; a new one is made later.
                self.fail(&format!(
                    "virtqueue worker of vring {i} did not stop within {STOP_TIMEOUT:?} (backend request stuck)"
                ));
            }
            Err(StopError::Panicked) => {
                warn!(device = %self.name, vring = i, "Virtqueue worker panicked: device needs reset");
                self.needs_reset.store(true, Ordering::Release);
            }
        }
    }

    /// Whether vring `i` can run: started, enabled, addressed, sized, memory present, and
    /// the device not waiting for a reset.
    fn vring_ready(&self, i: usize) -> bool {
        let Some(v) = self.vrings.get(i) else {
            return false;
        };
        self.mem.is_some()
            && v.addr.is_some()
            && v.kick.is_some()
            && v.started
            && v.enabled
            && v.size != 0
            && !self.held
            && !self.needs_reset.load(Ordering::Acquire)
    }

    /// Starts vring `i`'s group with every ready vring of it (restarting the group's
    /// worker if `i` is ready but not part of it yet).
    ///
    /// # Errors
    /// A ring whose addresses do not translate ([`RuntimeError::Vring`]), a handler the
    /// device refused, or a worker thread that could not start.
    pub fn update_vring(&mut self, i: usize) -> Result<(), RuntimeError> {
        let Some(&g) = self.group_of.get(i) else {
            return Ok(());
        };
        let members = self.groups[g].members.clone();
        let ready: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&m| self.vring_ready(m))
            .collect();
        if self.groups[g].worker.is_some() {
            if ready.iter().all(|&m| self.vrings[m].running) {
                return Ok(());
            }
            self.stop_vring(i);
        }
        if ready.is_empty() {
            return Ok(());
        }
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let features = self.acked;
        let packed = features.contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
        let mut queues = Vec::with_capacity(ready.len());
        for &m in &ready {
            let index = m as u16;
            let v = &self.vrings[m];
            let (Some((desc, avail, used)), Some(kick)) = (v.addr, v.kick.clone()) else {
                continue;
            };
            let cfg = VringConfig {
                size: v.size,
                desc_addr: desc,
                avail_addr: avail,
                used_addr: used,
                // A packed ring nobody set a base for starts at slot 0 with wrap counter 1.
                next_avail: if packed && !v.base_set {
                    0x8000
                } else {
                    v.base
                },
                event_idx: features.contains(VirtioFeatures::VIRTIO_RING_F_EVENT_IDX),
                indirect: features.contains(VirtioFeatures::VIRTIO_RING_F_INDIRECT_DESC),
                addrs_are_uaddr: self.addrs_are_uaddr,
            };
            let mut queue = Virtqueue::new(&cfg, mem.clone(), packed)
                .map_err(|source| RuntimeError::Vring { index, source })?;
            if let Some(map) = &self.inflight {
                // In the ring's layout (split or packed); chains a previous backend left in
                // flight are resubmitted first.
                if !queue.attach_inflight(map, index) {
                    if let Some(suppressed) = self.log_limits.request.check() {
                        warn!(device = %self.name, vring = m, size = cfg.size, packed, suppressed, "inflight buffer has no region for this vring (queue size or layout); not tracked");
                    }
                }
            }
            if let Some(log) = self.logging() {
                queue.set_dirty_log(Some(QueueLog {
                    log: log.clone(),
                    used_gpa: v.log_addr,
                }));
            }
            queues.push(WorkerQueue {
                index,
                queue,
                kick,
                call: self.vectors.handle(index).ok(),
                err: v.err.clone(),
                stats: QueueStatsRef::new(self.stats.clone(), m).ok_or(RuntimeError::Worker {
                    index,
                    reason: "no stats entry for this queue".into(),
                })?,
            });
        }
        let first = ready[0] as u16;
        let handler = match self.groups[g].handler.take() {
            Some(h) => h,
            None => self
                .device
                .group_handler(g as u16, features)
                .map_err(|e| RuntimeError::Device(e.0))?,
        };
        let needs_reset = self.needs_reset.clone();
        let state = self.state.clone();
        let notify = self.notify_config.clone();
        let end_session = self.end_session.clone();
        let name = self.name.clone();
        let limits = self.log_limits.clone();
        let thread = format!("{}-q{}", self.name, first);
        // The worker thread itself holds a reference to the device entry, so a worker stuck
        // in a backend request keeps the device "in use" until it really ends.
        let hold = self
            .res
            .as_ref()
            .and_then(|c| c.tracker.lookup(c.device.ty, c.device.id))
            .map(|r| Box::new(r.get(&format!("worker {thread}"))) as Box<dyn std::any::Any + Send>);
        let params = WorkerParams {
            name: thread,
            queues,
            handler,
            poll: self.poll,
            hold,
            on_error: Arc::new(move |e| {
                // Once per failure (the device stays failed until a reset), and at most
                // DEVICE_LOG_LINES_PER_SEC a second for a frontend that loops breaking its
                // ring and reconnecting.
                if let Some(suppressed) = limits.ring.check() {
                    if let WorkerError::MemoryFault { gpa, size } = e {
                        // The frontend shrank a memory fd under the daemon: an error line.
                        error!(device = %name, vring = first, gpa = format_args!("{gpa:#x}"), size = format_args!("{size:#x}"), suppressed, "Guest memory fault contained, device needs reset: {e}");
                    } else if let WorkerError::Forbidden { .. } | WorkerError::Sandbox(_) = e {
                        // A gap in the seccomp allow-list, or a worker doing what it must not.
                        error!(device = %name, vring = first, suppressed, "{e}");
                    } else {
                        warn!(device = %name, vring = first, suppressed, "Virtqueue failed, device needs reset: {e}");
                    }
                }
                needs_reset.store(true, Ordering::Release);
                // Visible to `dev show` at once, not only after the next request.
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.status |= DeviceStatus::DEVICE_NEEDS_RESET.bits();
                drop(st);
                // Tell the driver the device changed (virtio 1.2 §2.1.2: the device
                // notifies after setting NEEDS_RESET), where the transport can.
                if notify() {
                    debug!(device = %name, "config change notified to the driver");
                }
                if let (WorkerError::MemoryFault { .. }, Some(end)) = (e, &end_session) {
                    // The table is unusable (zeros where guest memory was): end the session
                    // so it is unmapped and the frontend must bring a new one.
                    info!(device = %name, "Ending the session: its guest memory faulted");
                    end();
                }
            }),
        };
        let worker = QueueWorker::spawn(params).map_err(|e| RuntimeError::Worker {
            index: first,
            reason: e.to_string(),
        })?;
        self.groups[g].worker = Some(worker);
        for &m in &ready {
            self.vrings[m].running = true;
            self.track_vring(m);
            debug!(device = %self.name, vring = m, size = self.vrings[m].size, base = self.vrings[m].base, "vring started");
        }
        Ok(())
    }

    /// Resource entries of running vring `i`: virtqueue, its worker, its call vector.
    fn track_vring(&mut self, i: usize) {
        let index = i as u16;
        let qname = format!("{}-q{}", self.name, i);
        let parent = self.session_id();
        let me = Owner::current();
        let has_call = self.vectors.trigger_fd(index).ok().flatten().is_some();
        let mut tracked: Vec<ResHandle> = Vec::new();
        if let Some(vq) = self.track(
            ResType::Virtqueue,
            qname.clone(),
            parent,
            self.frontend.clone(),
        ) {
            let vq_id = vq.id();
            tracked.extend(self.track(ResType::Worker, qname.clone(), Some(vq_id), me.clone()));
            if has_call {
                tracked.extend(self.track(
                    ResType::Vector,
                    format!("{qname}-call"),
                    Some(vq_id),
                    me,
                ));
            }
            tracked.insert(0, vq);
        }
        if let Some(v) = self.vrings.get_mut(i) {
            v.tracked = tracked;
        }
    }
}
