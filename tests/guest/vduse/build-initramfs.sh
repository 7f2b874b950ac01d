#!/usr/bin/env bash
# Build the initramfs of the VDUSE guest: busybox, ./init and the 9p-over-virtio modules of
# the 6.12 kernel that fetch-kernel.sh cached. Everything else comes from the host's root,
# which the guest mounts read-only over virtio-9p and chroots into.
#
# usage: build-initramfs.sh           (prints the initramfs path on stdout)
# env:   UVDPA_CACHE as for fetch-kernel.sh; FORCE=1 rebuilds even if up to date
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "vduse-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck disable=SC1090
. <("$here/fetch-kernel.sh" --quiet)
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"

# 9p over virtio; virtio, virtio_ring and virtio_pci are built into Debian's 6.12
WANT_MODULES=(netfs 9pnet 9pnet_virtio 9p)

out="$(dirname "$UVDPA_MODDEC")/../initramfs-$UVDPA_KVER"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
img="$out/initramfs.cpio.gz"
if [[ "${FORCE:-0}" != 1 && -s "$img" && "$img" -nt "$here/init" && "$img" -nt "${BASH_SOURCE[0]}" &&
      "$img" -nt /bin/busybox && "$img" -nt "$UVDPA_MODDEC/modules.dep" ]]; then
    echo "$img"
    exit 0
fi

declare -A depmap=() seen=()
while IFS= read -r line; do
    path="${line%%:*}"
    name="${path##*/}"; name="${name%%.ko*}"; name="${name//-/_}"
    depmap["$name"]="$line"
done < "$UVDPA_MODDEC/modules.dep"
order=()
visit() {
    local m="${1//-/_}" line dep
    [[ -z "${seen[$m]:-}" ]] || return 0
    seen["$m"]=1
    line="${depmap[$m]:-}"
    if [[ -z "$line" ]]; then
        grep -qE "/${m//_/[-_]}\.ko\$" "$UVDPA_MODDEC/modules.builtin" && return 0
        die "module $m neither in modules.dep nor built in"
    fi
    for dep in ${line#*:}; do
        dep="${dep##*/}"; visit "${dep%%.ko*}"
    done
    order+=("${line%%:*}")
}
for m in "${WANT_MODULES[@]}"; do visit "$m"; done

tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules,host,newroot}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
    [[ "$a" == busybox ]] || ln -s busybox "$root/bin/$a"
done
install -m 0755 "$here/init" "$root/init"
: > "$root/etc/uvdpa-modules"
for rel in "${order[@]}"; do
    [[ -r "$UVDPA_MODDEC/$rel" ]] || die "$UVDPA_MODDEC/$rel missing (FORCE=1 fetch-kernel.sh)"
    cp "$UVDPA_MODDEC/$rel" "$root/lib/modules/"
    echo "/lib/modules/${rel##*/}" >> "$root/etc/uvdpa-modules"
done
echo "$UVDPA_KVER" > "$root/etc/uvdpa-kver"
if command -v cpio > /dev/null; then cpio=(cpio --quiet -o -H newc -R 0:0); else cpio=(/bin/busybox cpio -o -H newc); fi
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "${cpio[@]}") | gzip -9n > "$tmp/initramfs.cpio.gz"
mv -f "$tmp/initramfs.cpio.gz" "$img"
log "built $img (kernel $UVDPA_KVER, modules: $(sed 's|.*/||; s|\.ko$||' "$root/etc/uvdpa-modules" | tr '\n' ' '))"
echo "$img"
