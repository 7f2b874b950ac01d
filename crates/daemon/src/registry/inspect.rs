//! What the registry reports and changes on a running device: `dev show`, `dev config
//! show`, interrupt vectors, coalescing, capacity, counters and metrics sources.

use super::*;

impl Registry {
    pub(super) fn view(m: &Managed) -> DeviceView {
        let st = m.server.session_state();
        let status = DeviceStatus::from_bits_retain(st.status);
        let state = if !st.connected {
            "ready"
        } else if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            "needs-reset"
        } else if status.contains(DeviceStatus::DRIVER_OK) || st.running_vrings > 0 {
            "live"
        } else {
            "connected"
        };
        let path = m.server.path();
        let sock = path.as_path();
        let vduse = matches!(m.spec.transport, Transport::Vduse { .. });
        let mut v = DeviceView {
            name: m.spec.name.clone(),
            mgmtdev: m.spec.mgmtdev().into(),
            transport: m.spec.transport.name().into(),
            vdpa: None,
            kernel_dev: None,
            backend: String::new(),
            socket: sock.display().to_string(),
            state: state.into(),
            status: status.names().into_iter().map(String::from).collect(),
            features: feature_names(st.features, m.spec.mgmtdev()),
            frontend_pid: st.frontend_pid,
            queues: m.spec.num_queues(),
            queue_size: m.spec.queue_size(),
            max_memory: (!vduse).then_some(m.spec.max_memory),
            capacity: None,
            read_only: None,
            aio: None,
            mac: None,
            mtu: None,
            max_vqp: None,
            qemu: String::new(),
            testpmd: None,
        };
        match &m.dev {
            Dev::Blk(cfg, blk) => {
                v.backend = cfg.backend.name().into();
                v.capacity = Some(blk.capacity_bytes());
                v.read_only = Some(blk.read_only());
                v.aio = blk.aio().map(|a| a.as_str().into());
                v.qemu = qemu_command_line(&m.spec.name, cfg.num_queues, cfg.queue_size, sock);
            }
            Dev::Net(n, _) => {
                let mac = MacDisplay(n.config.mac).to_string();
                let pairs = n.config.max_queue_pairs;
                v.backend = net_backend_name(&n.backend).into();
                v.qemu = qemu_net_command_line(pairs, &mac, n.config.mtu, sock);
                v.testpmd = Some(testpmd_vdev(pairs, sock));
                v.mac = Some(mac);
                v.mtu = Some(n.config.mtu);
                v.max_vqp = Some(pairs);
            }
        }
        if vduse {
            // Not a socket: the kernel's driver is attached through the vDPA bus.
            v.testpmd = None;
            (v.vdpa, v.kernel_dev) = vdpa_sysfs(&m.spec.name);
            v.qemu = match &v.kernel_dev {
                Some(d) if d.starts_with("vhost-vdpa-") => format!(
                    "qemu-system-x86_64 ... -device vhost-vdpa-device-pci,vhostdev=/dev/{d} ..."
                ),
                _ => String::new(),
            };
        }
        v
    }

    /// Views of one device or of all, sorted by name.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] for an unknown name.
    pub fn show(&self, name: Option<&str>) -> Result<Vec<DeviceView>, RegistryError> {
        let devs = self.lock();
        match name {
            Some(n) => devs
                .get(n)
                .map(|m| vec![Self::view(m)])
                .ok_or_else(|| RegistryError::NotFound(n.into())),
            None => Ok(devs.values().map(Self::view).collect()),
        }
    }

    /// The decoded config space of a device (net: with its backend and the features the
    /// driver negotiated).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn config(&self, name: &str) -> Result<ConfigView, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        match &m.dev {
            Dev::Blk(_, blk) => {
                let c = blk.config_space();
                Ok(ConfigView::Blk(BlkConfigView {
                    name: name.into(),
                    capacity: c.capacity,
                    size_max: c.size_max,
                    seg_max: c.seg_max,
                    blk_size: c.blk_size,
                    num_queues: c.num_queues,
                    max_discard_sectors: c.max_discard_sectors,
                    max_discard_seg: c.max_discard_seg,
                    discard_sector_alignment: c.discard_sector_alignment,
                    max_write_zeroes_sectors: c.max_write_zeroes_sectors,
                    max_write_zeroes_seg: c.max_write_zeroes_seg,
                    write_zeroes_may_unmap: c.write_zeroes_may_unmap != 0,
                    aio: blk.aio().map(|a| a.as_str().into()),
                }))
            }
            Dev::Net(spec, net) => {
                // What the driver reads (the MAC may have been changed on the control
                // queue); the configured values if the space cannot be decoded.
                let c = VirtioNetConfig::from_le_bytes(&net.config())
                    .unwrap_or_else(|| spec.config.virtio_config());
                let st = m.server.session_state();
                let (tap, switch, frame_len) = match &spec.backend {
                    NetBackendSpec::Tap { .. } => (net.tap_name().map(String::from), None, None),
                    NetBackendSpec::Switch { name } => (None, Some(name.clone()), None),
                    NetBackendSpec::Source { frame_len } => (None, None, Some(*frame_len)),
                    NetBackendSpec::Loopback | NetBackendSpec::Sink => (None, None, None),
                };
                Ok(ConfigView::Net(NetConfigView {
                    name: name.into(),
                    mac: MacDisplay(c.mac).to_string(),
                    mtu: c.mtu,
                    max_vqp: c.max_virtqueue_pairs,
                    link: if c.status & VIRTIO_NET_S_LINK_UP != 0 {
                        "up"
                    } else {
                        "down"
                    }
                    .into(),
                    backend: net_backend_name(&spec.backend).into(),
                    tap,
                    switch,
                    frame_len,
                    negotiated_features: feature_names(st.features, "net"),
                }))
            }
        }
    }

    fn with_server<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Managed) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        f(m)
    }

    /// The interrupt vector table of a device.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn irq_show(&self, name: &str) -> Result<Vec<VectorView>, RegistryError> {
        self.with_server(name, |m| {
            Ok(m.server
                .vectors()
                .snapshot()
                .into_iter()
                .map(|v| VectorView {
                    vec: v.index,
                    trigger: v.has_trigger,
                    masked: v.masked,
                    pending: v.pending,
                    coalesce_usecs: v.max_delay_us,
                    coalesce_frames: v.max_batch,
                    signals: v.counters.signals(),
                    suppressed_event_idx: v.counters.suppressed_event_idx,
                    suppressed_coalesced: v.counters.suppressed_coalesced,
                    suppressed_masked: v.counters.suppressed_masked,
                })
                .collect())
        })
    }

    /// Fires vector `vec` by hand (DATA_NONE for one vector); returns whether a signal
    /// was sent (false without a trigger, or masked).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`] for a vector out of range.
    pub fn irq_trigger(&self, name: &str, vec: u32) -> Result<bool, RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(vec).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .trigger(v)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx: vec,
                    queues: m.spec.num_queues(),
                })
        })
    }

    /// Sets a queue vector's coalescing (µs, completion batches; 0/0 = off).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn set_coalesce(
        &self,
        name: &str,
        qidx: u32,
        usecs: u32,
        frames: u32,
    ) -> Result<(), RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(qidx).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .set_coalesce(v, usecs, frames)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx,
                    queues: m.spec.num_queues(),
                })
        })
    }

    /// Changes the capacity of blk device `name` to `bytes` while it is served (qemu's
    /// `block_resize`; see [`BlkDevice::resize`] for what each backend does), then tells
    /// the driver through the transport (a configuration change notification). Returns
    /// the device's view and whether the driver was notified.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::Set`] for a net device, a read-only
    /// one, a size that is not a positive multiple of the logical block size, or one the
    /// backend cannot take.
    pub fn set_capacity(
        &self,
        name: &str,
        bytes: u64,
    ) -> Result<(DeviceView, bool), RegistryError> {
        let mut devs = self.lock();
        let m = devs
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let set_err = |reason: String| RegistryError::Set {
            name: name.into(),
            attr: "capacity",
            reason,
        };
        let Dev::Blk(cfg, blk) = &mut m.dev else {
            return Err(set_err("only blk devices have a capacity".into()));
        };
        let old = blk.resize(bytes).map_err(|e| set_err(error_chain(&e)))?;
        match &mut cfg.backend {
            BackendSpec::Ram { size } | BackendSpec::Null { size } => *size = bytes,
            BackendSpec::File { .. } | BackendSpec::Nbd(_) | BackendSpec::Rbd(_) => {}
        }
        let notified = m.server.config_changed(name);
        info!(
            device = name,
            old,
            new = bytes,
            notified,
            "capacity changed"
        );
        Ok((Self::view(m), notified))
    }

    /// Handles to every device's counters for one metrics scrape, sorted by name.
    pub fn metrics_sources(&self) -> Vec<MetricsSource> {
        let devs = self.lock();
        devs.values()
            .map(|m| {
                let st = m.server.session_state();
                let kind = match &m.dev {
                    Dev::Blk(_, blk) => MetricsKind::Blk(blk.clone()),
                    Dev::Net(n, _) => {
                        let negotiated = if st.features == 0 {
                            VirtioFeatures::VIRTIO_NET_F_MQ
                        } else {
                            VirtioFeatures::from_raw(st.features)
                        };
                        MetricsKind::Net(
                            (0..m.spec.num_queues())
                                .map(|i| QueueRole::of(i, n.config.max_queue_pairs, negotiated))
                                .collect(),
                        )
                    }
                };
                MetricsSource {
                    name: m.spec.name.clone(),
                    transport: m.spec.transport.name(),
                    status: st.status,
                    connected: st.connected,
                    stats: m.server.stats().clone(),
                    sessions: m.server.sessions(),
                    kind,
                }
            })
            .collect()
    }

    /// Names of the devices served, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Counters of queue `qidx`, and a duplicate of the stats table's memfd with its
    /// number of entries (for live watching by the CLI).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn vstats(
        &self,
        name: &str,
        qidx: u32,
    ) -> Result<(QueueStatsView, Option<std::os::fd::OwnedFd>, usize), RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let table = m.server.stats();
        let q = table.queue(qidx as usize).ok_or(RegistryError::NoQueue {
            name: name.into(),
            qidx,
            queues: m.spec.num_queues(),
        })?;
        let view = match &m.dev {
            Dev::Blk(..) => QueueStatsView::Blk(vstats_view(name, qidx, q)),
            Dev::Net(n, _) => {
                // Before a driver negotiated features, the layout of a device with MQ.
                let st = m.server.session_state();
                let negotiated = if st.features == 0 {
                    VirtioFeatures::VIRTIO_NET_F_MQ
                } else {
                    VirtioFeatures::from_raw(st.features)
                };
                let role = u16::try_from(qidx)
                    .ok()
                    .and_then(|i| QueueRole::of(i, n.config.max_queue_pairs, negotiated));
                QueueStatsView::Net(net_vstats_view(name, qidx, role, q))
            }
        };
        Ok((view, table.fd().try_clone_to_owned().ok(), table.queues()))
    }
}
