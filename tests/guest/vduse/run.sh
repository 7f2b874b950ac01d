#!/usr/bin/env bash
# Boot Debian's 6.12 kernel (it has VDUSE) under QEMU (TCG) with the host's / read-only
# over virtio-9p, and run a host shell script inside it.
#
# usage: run.sh --script HOST_PATH [options]
#   --script FILE    the script to run in the guest with the host's sh (dash), chrooted into
#                    the host's root; it is copied, so it may live anywhere (even /tmp)
#   --out DIR        a host directory the guest mounts read-write at /out (logs, results;
#                    created if missing). Without it /out is an empty tmpfs directory
#   --env NAME=VAL   also export NAME=VAL to the script (repeatable)
#   --timeout SECS   kill QEMU after SECS (default 300)
#   --smp N          guest vCPUs (default 2)
#   --mem MIB        guest RAM in MiB (default 2048)
#   --append STR     extra kernel command line
# env:  QEMU=qemu-system-x86_64, QEMU_EXTRA="extra qemu args", UVDPA_CACHE (fetch-kernel.sh)
#
# The guest's paths are the host's: the repository, target/, $HOME/.cache/uvdpa and the
# binaries in /usr are all there (read-only), except /tmp, /run and /dev/shm (the guest's own
# tmpfs). The script's environment: UVDPA_LIB (lib.sh, `. "$UVDPA_LIB"`; load-vduse-modules
# is on PATH), UVDPA_REPO,
# UVDPA_KVER, UVDPA_MODDIR, UVDPA_MODDEC, UVDPA_OUT=/out, plus the --env variables.
#
# The console (the script's stdout and stderr) goes to stdout, CRLF turned into LF. Exit
# status: 0 if the guest printed "UVDPA-GUEST-RESULT: PASS", 1 on FAIL (the script exited
# non-zero), 2 on timeout / no result line, 3 on usage errors.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 3; }
die() { echo "vduse-run: $*" >&2; exit 3; }

script="" out="" timeout_s=300 smp=2 mem=2048 append="" envs=()
while [[ $# -gt 0 ]]; do
    case "$1" in -h | --help) usage ;; esac
    [[ $# -ge 2 ]] || die "missing value for $1"
    case "$1" in
        --script) script="$2" ;;
        --out) out="$2" ;;
        --env) [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env $2 (NAME=VALUE)"
               envs+=("$2") ;;
        --timeout) timeout_s="$2" ;;
        --smp) smp="$2" ;;
        --mem) mem="$2" ;;
        --append) append="$2" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[[ -n "$script" ]] || die "need --script FILE"
[[ -r "$script" ]] || die "$script is not readable"
for v in "$timeout_s" "$smp" "$mem"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "bad number: $v"
done

# kernel (cached after the first run) and initramfs (rebuilt only when stale)
fetch_out="$("$here/fetch-kernel.sh")" || { echo "vduse-run: fetching the 6.12 kernel failed" >&2; exit 2; }
eval "$fetch_out"
initrd="$("$here/build-initramfs.sh")" || { echo "vduse-run: building the initramfs failed" >&2; exit 2; }

ctl="$(mktemp -d "${TMPDIR:-/tmp}/uvdpa-vduse.XXXXXX")"
trap 'rm -rf "$ctl"' EXIT
cp "$script" "$ctl/script"
# lib.sh and load-vduse-modules travel in the control share: the checkout may be under /tmp,
# which the guest does not see
mkdir -p "$ctl/bin"
cp "$here/lib.sh" "$ctl/lib.sh"
cp "$here/load-vduse-modules" "$ctl/bin/load-vduse-modules"
case "$repo" in /tmp/* | /run/* | /dev/shm/*)
    echo "vduse-run: warning: $repo is under /tmp, /run or /dev/shm, which the guest does not see" >&2 ;;
esac
q() { printf "%s='%s'\n" "$1" "${2//\'/\'\\\'\'}"; }  # NAME='VALUE' for sh
{
    q UVDPA_LIB /run/uvdpa-guest/lib.sh
    q UVDPA_REPO "$repo"
    q UVDPA_KVER "$UVDPA_KVER"
    q UVDPA_MODDIR "$UVDPA_MODDIR"
    q UVDPA_MODDEC "$UVDPA_MODDEC"
    for kv in ${envs[@]+"${envs[@]}"}; do q "${kv%%=*}" "${kv#*=}"; done
} > "$ctl/env"
chmod -R a+rX "$ctl"

cmdline="console=ttyS0 panic=-1 quiet"
[[ -z "$append" ]] || cmdline+=" $append"
# shellcheck disable=SC2054 # commas are QEMU's
args=(-accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem"M
      -nodefaults -no-reboot -display none -serial stdio
      -kernel "$UVDPA_KERNEL" -initrd "$initrd" -append "$cmdline"
      # the host's / read-only; multidevs=remap keeps inodes of different host file
      # systems apart
      -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
      -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
      -fsdev "local,id=uvdpactl,path=${ctl//,/,,},security_model=none,readonly=on"
      -device virtio-9p-pci,fsdev=uvdpactl,mount_tag=uvdpactl)
if [[ -n "$out" ]]; then
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    args+=(-fsdev "local,id=uvdpaout,path=${out//,/,,},security_model=none"
           -device virtio-9p-pci,fsdev=uvdpaout,mount_tag=uvdpaout)
fi
# shellcheck disable=SC2206 # QEMU_EXTRA is split on purpose
[[ -z "${QEMU_EXTRA:-}" ]] || args+=(${QEMU_EXTRA})

log="$ctl.log"
trap 'rm -rf "$ctl" "$log"' EXIT
start=$(date +%s.%N)
set +e
# stdin from /dev/null: QEMU must not grab (or stop on) the caller's tty
timeout -k 5 "$timeout_s" "${QEMU:-qemu-system-x86_64}" "${args[@]}" < /dev/null 2>&1 |
    sed -u 's/\r$//' | tee "$log"
rc=("${PIPESTATUS[@]}")
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

result="$(grep -m1 '^UVDPA-GUEST-RESULT: ' "$log" || true)"
if [[ "${rc[0]}" == 124 || "${rc[0]}" == 137 ]]; then
    echo "vduse-run: TIMEOUT after ${timeout_s}s" >&2
fi
case "$result" in
    "UVDPA-GUEST-RESULT: PASS"*) echo "vduse-run: PASS in ${elapsed}s" >&2; exit 0 ;;
    "UVDPA-GUEST-RESULT: FAIL"*) echo "vduse-run: FAIL in ${elapsed}s" >&2; exit 1 ;;
    *) echo "vduse-run: no result line (qemu exit ${rc[0]}, ${elapsed}s)" >&2; exit 2 ;;
esac
