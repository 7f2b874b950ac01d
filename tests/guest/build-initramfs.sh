#!/usr/bin/env bash
# Build the uvdpa test guest: OUT_DIR/initramfs.cpio.gz + OUT_DIR/kernel.
#
# usage: build-initramfs.sh [OUT_DIR]      (default: <this dir>/out)
# env:   KVER=<version>   use this kernel instead of the newest /boot/vmlinuz-*
#        KERNEL=<path>    kernel image (default /boot/vmlinuz-$KVER)
#        MODDIR=<dir>     its modules (default /lib/modules/$KVER)
#        FORCE=1          rebuild even if up to date
#
# The initramfs holds /bin/busybox (busybox-static) with applet symlinks,
# our ./init, and the virtio-blk and virtio-net on PCI, 9p-over-virtio and
# ext4 modules (plus their modules.dep dependencies, e.g. net_failover and
# failover for virtio_net, netfs and fscache for 9p, jbd2 for ext4)
# decompressed, in load order listed in /etc/uvdpa-modules.
# Prints the kernel path (OUT_DIR/kernel, a symlink) on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Modules we need; dependencies are resolved from modules.dep.
# 9p over virtio (9pnet_virtio, 9p; netfs and fscache come from modules.dep) mounts the
# host's root for the matrix mode's host tools; ext4 (+ crc32c for its metadata
# checksums) is the filesystem it tests.
WANT_MODULES=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
              failover net_failover virtio_net
              9pnet 9pnet_virtio 9p crc32c_generic ext4)

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- pick the kernel -------------------------------------------------------
if [[ -z "${KVER:-}" ]]; then
    newest="$(printf '%s\n' /boot/vmlinuz-* | sort -V | tail -n 1)"
    [[ -e "$newest" ]] || die "no /boot/vmlinuz-* (apt-get install linux-image-amd64)"
    KVER="${newest#/boot/vmlinuz-}"
fi
kernel="${KERNEL:-/boot/vmlinuz-$KVER}"
moddir="${MODDIR:-/lib/modules/$KVER}"
[[ -r "$kernel" ]] || die "kernel $kernel missing or unreadable"
[[ -r "$moddir/modules.dep" ]] || die "$moddir/modules.dep missing"
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"
/bin/busybox --list | grep -qx sh || die "/bin/busybox has no sh applet"

img="$out/initramfs.cpio.gz"
stamp="$out/kver"
stamp_val="$KVER $kernel $moddir"

# --- up to date? -----------------------------------------------------------
up_to_date() {
    [[ -s "$img" && -f "$stamp" ]] || return 1
    [[ "$(cat "$stamp")" == "$stamp_val" ]] || return 1
    local f
    for f in "${BASH_SOURCE[0]}" "$here/init" /bin/busybox "$moddir/modules.dep"; do
        [[ "$img" -nt "$f" ]] || return 1
    done
}
if [[ "${FORCE:-0}" != 1 ]] && up_to_date; then
    ln -sfn "$kernel" "$out/kernel"
    log "up to date: $img (kernel $KVER)"
    echo "$out/kernel"
    exit 0
fi

# --- resolve module load order (deps first) from modules.dep ---------------
declare -A depmap=() seen=()
while IFS= read -r line; do
    path="${line%%:*}"
    name="${path##*/}"; name="${name%%.ko*}"; name="${name//-/_}"
    depmap["$name"]="$path:${line#*:}"
done < "$moddir/modules.dep"

builtin_mod() {  # is module $1 built into the kernel?
    grep -qE "/${1//_/[-_]}\.ko\$" "$moddir/modules.builtin" 2>/dev/null
}

order=()
visit() {
    local m="${1//-/_}" entry dep
    [[ -n "${seen[$m]:-}" ]] && return 0
    seen["$m"]=1
    if [[ -z "${depmap[$m]:-}" ]]; then
        builtin_mod "$m" && { log "$m is built in"; return 0; }
        die "module $m not found in $moddir/modules.dep and not built in"
    fi
    entry="${depmap[$m]}"
    for dep in ${entry#*:}; do
        dep="${dep##*/}"; visit "${dep%%.ko*}"
    done
    order+=("${entry%%:*}")
}
for m in "${WANT_MODULES[@]}"; do visit "$m"; done

# --- assemble the tree -----------------------------------------------------
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules,host,mnt}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
    [[ "$a" == busybox ]] || ln -s busybox "$root/bin/$a"
done
install -m 0755 "$here/init" "$root/init"

: > "$root/etc/uvdpa-modules"
for rel in "${order[@]}"; do
    src="$moddir/$rel"
    base="$(basename "$rel")"
    dst="$root/lib/modules/${base%%.ko*}.ko"
    case "$base" in   # busybox insmod can't be trusted with compressed modules
        *.ko)     cp "$src" "$dst" ;;
        *.ko.xz)  xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$dst" ;;
        *.ko.gz)  gzip -dc "$src" > "$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
    echo "/lib/modules/$(basename "$dst")" >> "$root/etc/uvdpa-modules"
done
echo "$KVER" > "$root/etc/uvdpa-kver"
log "kernel $KVER, modules: $(sed 's|.*/||; s|\.ko$||' "$root/etc/uvdpa-modules" | tr '\n' ' ')"

# newc cpio (host cpio, or busybox's), gzip'd; written atomically.
if command -v cpio > /dev/null; then cpio=(cpio --quiet -o -H newc -R 0:0); else cpio=(/bin/busybox cpio -o -H newc); fi
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "${cpio[@]}") | gzip -9n > "$tmp/initramfs.cpio.gz"
mv -f "$tmp/initramfs.cpio.gz" "$img"
echo "$stamp_val" > "$stamp"
ln -sfn "$kernel" "$out/kernel"
log "built $img ($(stat -c %s "$img") bytes)"
echo "$out/kernel"
