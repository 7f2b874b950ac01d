#!/usr/bin/env bash
# Fetch Debian bookworm-backports' 6.12 kernel (it has VDUSE: CONFIG_VDPA_USER=m) into a
# private cache, without installing it and without touching the host's apt state.
#
# usage: fetch-kernel.sh [--quiet]       (--quiet: no progress messages on stderr)
# env:   UVDPA_CACHE=<dir>        cache root (default $HOME/.cache/uvdpa); the kernel goes to
#                                 $UVDPA_CACHE/kernel-6.12
#        UVDPA_KERNEL_PKG=<name>  the image package to fetch (default: what backports'
#                                 linux-image-amd64 depends on, resolved on first fetch)
#        FORCE=1                  fetch again even if a kernel is cached
#
# Idempotent: once a kernel is unpacked, later runs only print its paths (no network).
# Prints KEY=VALUE lines on stdout (also written to <cache>/kernel.env, sourceable):
#   UVDPA_KVER      the kernel release, e.g. 6.12.95+deb12-amd64
#   UVDPA_KPKG      the package name and version it came from
#   UVDPA_KERNEL    the vmlinuz
#   UVDPA_MODDIR    its /lib/modules/<kver> tree (modules as .ko.xz)
#   UVDPA_MODDEC    decompressed copies of the modules the guest uses (same relative
#                   paths, .ko), with a modules.dep that names .ko files
# The guest sees the same paths over virtio-9p, so the cache must not be under /tmp or /run
# (the guest mounts tmpfs there).
set -euo pipefail

log() { [[ -n "$quiet" ]] || echo "fetch-kernel: $*" >&2; }
die() { echo "fetch-kernel: error: $*" >&2; exit 1; }

quiet=""
[[ "${1:-}" != --quiet ]] || quiet=1

cache="${UVDPA_CACHE:-$HOME/.cache/uvdpa}/kernel-6.12"
envfile="$cache/kernel.env"

# Modules the guest may load, decompressed up front (their modules.dep dependencies too).
# 9p stack and virtio-pci: the initramfs; vDPA/VDUSE + virtio-blk/net: lib.sh's
# load_vduse_modules; ext4: mkfs tests; null_blk: the benchmark's ceiling.
WANT_MODULES=(virtio_pci netfs 9pnet 9pnet_virtio 9p
              vhost_iotlb vdpa vduse virtio_vdpa vhost_vdpa virtio_blk
              failover net_failover virtio_net
              crc32c_generic ext4 null_blk loop)

print_env() { cat "$envfile"; }

if [[ "${FORCE:-0}" != 1 && -s "$envfile" ]]; then
    # shellcheck disable=SC1090
    . "$envfile"
    if [[ -r "$UVDPA_KERNEL" && -r "$UVDPA_MODDEC/modules.dep" ]]; then
        log "cached: $UVDPA_KPKG"
        print_env
        exit 0
    fi
fi

case "$cache" in /tmp/* | /run/*)
    log "warning: $cache is under /tmp or /run, which the guest hides behind tmpfs" ;;
esac
command -v apt-get > /dev/null || die "apt-get not found (a Debian host is needed)"
command -v dpkg-deb > /dev/null || die "dpkg-deb not found"
command -v xz > /dev/null || die "xz not found (apt-get install xz-utils)"

# --- a private apt configuration for bookworm-backports ---------------------------------
# The archive URI is the host's own Debian source (whatever mirror it uses).
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[[ -n "$codename" ]] || die "no VERSION_CODENAME in /etc/os-release"
uri=""
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    # deb822 stanzas: the first with Types: deb and Suites holding "$codename" exactly
    uri="$(awk -v c="$codename" '
        function flush() { if (deb && hit && u != "" && out == "") out = u; deb = hit = 0; u = "" }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]*#/ { next }
        tolower($1) == "types:"  { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
        tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == c) hit = 1 }
        tolower($1) == "uris:"   { u = $2 }
        END { flush(); print out }' "$f")"
    [[ -z "$uri" ]] || break
done
if [[ -z "$uri" ]]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        # deb [opts] URI SUITE COMPONENTS...
        uri="$(awk -v c="$codename" '
            $1 != "deb" { next }
            { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } }
            $(i + 1) == c { print $i; exit }' "$f")"
        [[ -z "$uri" ]] || break
    done
fi
[[ -n "$uri" ]] || die "no Debian '$codename' source found in /etc/apt/sources.list{,.d/*} to reuse"
uri="${uri%/}"

aptdir="$cache/apt"
mkdir -p "$aptdir/sources.list.d" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$cache/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r "$keyring" ]] || die "$keyring missing (apt-get install debian-archive-keyring)"
cat > "$aptdir/sources.list.d/backports.sources" << EOF
Types: deb
URIs: $uri
Suites: $codename-backports
Components: main
Signed-By: $keyring
EOF
apt_opts=(-o "Dir::Etc::SourceList=/dev/null"
          -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
          -o "Dir::State::Lists=$aptdir/lists"
          -o "Dir::Cache=$aptdir/cache"
          -o "APT::Get::List-Cleanup=0"
          -o "Debug::NoLocking=1")
log "apt-get update ($codename-backports from $uri)"
apt-get -q "${apt_opts[@]}" update > "$aptdir/update.log" 2>&1 ||
    die "apt-get update of $codename-backports failed (see $aptdir/update.log): $(tail -n 3 "$aptdir/update.log")"

pkg="${UVDPA_KERNEL_PKG:-}"
if [[ -z "$pkg" ]]; then
    # backports' metapackage names the current image package
    pkg="$(apt-cache "${apt_opts[@]}" show linux-image-amd64 2> /dev/null |
           sed -n 's/^Depends: *\(linux-image-6\.12[^ ,]*\).*/\1/p' | head -n 1)"
    [[ -n "$pkg" ]] || die "backports' linux-image-amd64 does not depend on a linux-image-6.12.* package"
fi
ver="$(apt-cache "${apt_opts[@]}" show "$pkg" 2> /dev/null | sed -n 's/^Version: //p' | head -n 1)"
[[ -n "$ver" ]] || die "package $pkg not found in $codename-backports"

deb="$(ls -t "$cache/debs/${pkg}_${ver}_"*.deb 2> /dev/null | head -n 1 || true)"
if [[ -n "$deb" && -s "$deb" ]]; then
    log "already downloaded: $(basename "$deb")"
else
    log "downloading $pkg $ver"
    (cd "$cache/debs" && apt-get -q "${apt_opts[@]}" download "$pkg=$ver" > "$aptdir/download.log" 2>&1) ||
        die "apt-get download $pkg=$ver failed (see $aptdir/download.log): $(tail -n 3 "$aptdir/download.log")"
fi
deb="$(ls -t "$cache/debs/${pkg}_"*.deb 2> /dev/null | head -n 1)"
[[ -n "$deb" && -s "$deb" ]] || die "downloaded .deb of $pkg not found in $cache/debs"

# --- unpack ---------------------------------------------------------------------------
root="$cache/root-$pkg"
rm -rf "$root.tmp"
mkdir -p "$root.tmp"
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$root.tmp"
rm -rf "$root"
mv "$root.tmp" "$root"
kernel="$(ls "$root"/boot/vmlinuz-* 2> /dev/null | head -n 1)"
[[ -n "$kernel" ]] || die "$deb has no boot/vmlinuz-*"
kver="${kernel##*/vmlinuz-}"
moddir="$root/lib/modules/$kver"
[[ -d "$moddir/kernel" ]] || die "$deb has no lib/modules/$kver/kernel"
# modules.dep is made by depmod at install time, not shipped: make it here
if command -v depmod > /dev/null || [[ -x /sbin/depmod ]]; then
    PATH="$PATH:/sbin:/usr/sbin" depmod -b "$root" "$kver" || die "depmod failed"
else
    # no kmod on this host: read each module's modinfo "depends=" (what depmod uses)
    log "no depmod: reading module dependencies from modinfo (takes a few seconds)"
    (cd "$moddir" && find kernel -name '*.ko*' | LC_ALL=C sort |
        xargs -P "$(nproc)" -n 64 sh -c '
            for f; do
                case "$f" in *.xz) c="xz -dc";; *.zst) c="zstd -qdc";; *.gz) c="gzip -dc";; *) c=cat;; esac
                printf "%s\t%s\n" "$f" "$($c "$f" | tr "\0" "\n" | sed -n "s/^depends=//p" | head -n 1)"
            done' sh) > "$moddir/.deps.raw" || die "reading modinfo failed"
    awk -F '\t' '
        { path[NR] = $1; deps[NR] = $2; n = $1; sub(/.*\//, "", n); sub(/\.ko.*/, "", n)
          gsub(/-/, "_", n); byname[n] = $1 }
        END { for (i = 1; i <= NR; i++) {
                  line = path[i] ":"; k = split(deps[i], d, ",")
                  for (j = 1; j <= k; j++) { m = d[j]; gsub(/-/, "_", m); if (m in byname) line = line " " byname[m] }
                  print line } }' "$moddir/.deps.raw" > "$moddir/modules.dep"
    rm -f "$moddir/.deps.raw"
fi
[[ -r "$moddir/modules.dep" ]] || die "no modules.dep for $kver"
grep -q '/vduse\.ko' "$moddir/modules.dep" || die "$pkg has no vduse module"

# --- decompress the modules we use (with their dependencies) --------------------------
moddec="$cache/modules-decompressed/$kver"
rm -rf "$moddec.tmp"
mkdir -p "$moddec.tmp"
declare -A depmap=() seen=()
while IFS= read -r line; do
    path="${line%%:*}"
    name="${path##*/}"; name="${name%%.ko*}"; name="${name//-/_}"
    depmap["$name"]="$line"
done < "$moddir/modules.dep"
decompress() {
    local m="${1//-/_}" line dep rel
    [[ -z "${seen[$m]:-}" ]] || return 0
    seen["$m"]=1
    line="${depmap[$m]:-}"
    if [[ -z "$line" ]]; then
        grep -qE "/${m//_/[-_]}\.ko\$" "$moddir/modules.builtin" 2> /dev/null && return 0
        die "module $m neither in modules.dep nor built in"
    fi
    for dep in ${line#*:}; do
        dep="${dep##*/}"; decompress "${dep%%.ko*}"
    done
    rel="${line%%:*}"
    mkdir -p "$moddec.tmp/$(dirname "$rel")"
    case "$rel" in
        *.ko)     cp "$moddir/$rel" "$moddec.tmp/$rel" ;;
        *.ko.xz)  xz -dc "$moddir/$rel" > "$moddec.tmp/${rel%.xz}" ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" > "$moddec.tmp/${rel%.zst}" ;;
        *.ko.gz)  gzip -dc "$moddir/$rel" > "$moddec.tmp/${rel%.gz}" ;;
        *) die "unknown module format: $rel" ;;
    esac
}
for m in "${WANT_MODULES[@]}"; do decompress "$m"; done
# modules.dep naming the decompressed files (all modules, so lib.sh can resolve any name;
# the ones not decompressed here are decompressed by the guest on demand)
sed -E 's/\.ko\.(xz|zst|gz)/.ko/g' "$moddir/modules.dep" > "$moddec.tmp/modules.dep"
cp "$moddir/modules.builtin" "$moddec.tmp/modules.builtin"
rm -rf "$moddec"
mv "$moddec.tmp" "$moddec"

cat > "$envfile.tmp" << EOF
UVDPA_KVER=$kver
UVDPA_KPKG='$pkg $ver'
UVDPA_KERNEL=$kernel
UVDPA_MODDIR=$moddir
UVDPA_MODDEC=$moddec
EOF
mv "$envfile.tmp" "$envfile"
log "ready: $pkg $ver ($(find "$moddec" -name '*.ko' | wc -l) modules decompressed)"
print_env
