#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks need, when they are missing:
# QEMU (the guest tests and qemu-storage-daemon, the benchmark peer), Debian's kernel for the
# guest, and busybox for its initramfs.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx dd || need+=(busybox-static)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: all present"
    exit 0
fi
echo "install-deps: installing ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
