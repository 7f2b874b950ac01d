#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks need, when they are missing:
# QEMU (the guest tests and qemu-storage-daemon, the benchmark peer), Debian's kernel for the
# guest, busybox for its initramfs, fio and e2fsprogs for the guest's real-workload matrix,
# DPDK (dpdk-testpmd: the virtio-net driver and the
# reference vhost-user backend of the net tests and benches/net.sh), and the VDUSE guest's
# 6.12 kernel (tests/guest/vduse/fetch-kernel.sh), libvirt-clients (virt-xml-validate, virsh),
# libvirtd with its QEMU driver, and
# the NBD servers nbdkit and qemu-nbd (qemu-utils), and Ceph (librbd, a monitor and an OSD).
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx dd || need+=(busybox-static)
# Host binaries the guest runs over virtio-9p in tests/guest's matrix mode
# (crates/daemon/tests/blk_matrix.rs): fio, mkfs.ext4/e2fsck; blkdiscard and fallocate
# come with util-linux.
command -v fio >/dev/null || need+=(fio)
[ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
{ command -v blkdiscard && command -v fallocate; } >/dev/null || need+=(util-linux)
# DPDK 22.11 (Debian 12): dpdk-testpmd is in dpdk-dev; the virtio-user and vhost PMDs it
# loads are only recommended by the dpdk package, so they are named here.
command -v dpdk-testpmd >/dev/null || need+=(dpdk dpdk-dev)
ls /usr/lib/*/dpdk/pmds-*/librte_net_virtio.so >/dev/null 2>&1 || need+=(librte-net-virtio23)
ls /usr/lib/*/dpdk/pmds-*/librte_net_vhost.so >/dev/null 2>&1 || need+=(librte-net-vhost23)
# The VDUSE guest (tests/guest/vduse): iproute2's vdpa binds VDUSE devices, xz unpacks the
# 6.12 kernel's modules.
command -v vdpa >/dev/null || [ -x /usr/sbin/vdpa ] || [ -x /sbin/vdpa ] || need+=(iproute2)
command -v xz >/dev/null || need+=(xz-utils)
# tcpdump reads back the pcapng files of `uvdpa dev capture` (crates/daemon/tests/capture.rs).
command -v tcpdump >/dev/null || [ -x /usr/bin/tcpdump ] || need+=(tcpdump)
# libvirt's domain XML schema and virt-xml-validate, for the README's libvirt examples
# (crates/daemon/tests/service.rs validates contrib/libvirt/*.xml).
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
# libvirtd and its QEMU driver: crates/daemon/tests/libvirt_guest.rs starts a private
# session-mode libvirtd and boots a guest with `virsh create` on a uvdpa disk.
command -v libvirtd >/dev/null || [ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon)
ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so >/dev/null 2>&1 ||
    need+=(libvirt-daemon-driver-qemu)
# A peer of another uid connects with python3 (crates/daemon/tests/socket_access.rs).
[ -x /usr/bin/python3 ] || need+=(python3)
# NBD servers the `nbd` backend is tested against (crates/daemon/tests/blk_nbd.rs): nbdkit
# (memory and file plugins, error/delay/blocksize-policy filters) and qemu-nbd.
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
# Ceph for the `rbd` backend: librbd/librados to link against, and the single-node
# cluster of scripts/ceph.sh (crates/daemon/tests/blk_rbd.rs): monitor, OSD, ceph/rbd tools.
[ -e /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
[ -e /usr/include/rados/librados.h ] || need+=(librados-dev)
command -v ceph-mon >/dev/null || [ -x /usr/bin/ceph-mon ] || need+=(ceph-mon)
command -v ceph-osd >/dev/null || [ -x /usr/bin/ceph-osd ] || need+=(ceph-osd)
{ command -v ceph && command -v rbd; } >/dev/null || need+=(ceph-common)
command -v uuidgen >/dev/null || need+=(uuid-runtime)
# qemu-storage-daemon's rbd block driver, the peer of benches/rbd.sh.
ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 || need+=(qemu-block-extra)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: all packages present"
else
    echo "install-deps: installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Debian bookworm-backports' 6.12 kernel for the VDUSE guest (Debian 12's own 6.1 has no
# vDPA): downloaded and unpacked into ~/.cache/uvdpa, not installed; instant once cached.
"$(dirname "${BASH_SOURCE[0]}")/../tests/guest/vduse/fetch-kernel.sh" > /dev/null
