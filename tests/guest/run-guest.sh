#!/usr/bin/env bash
# Boot the uvdpa test guest under QEMU (TCG) and report its result.
#
# usage: run-guest.sh (--vhost-user-blk SOCK | --drive FILE) [options]
#   --vhost-user-blk SOCK  attach a vhost-user-blk device served on SOCK
#   --reconnect SECS       with --vhost-user-blk: chardev reconnect=SECS, so QEMU
#                          (re)connects in the background, retrying every SECS;
#                          SOCK need not exist yet and the backend may restart
#   --drive FILE           use QEMU's own virtio-blk on a raw FILE (self-test)
#   --queues N             virtqueues of the device (default 1)
#   --smp N                guest vCPUs (default 1)
#   --mode verify|write|read|loop, --seed N, --count N, --bs BYTES, --secs N
#                          passed to the guest as uvdpa.* (see ./init)
#   --append STR           extra kernel command line (e.g. uvdpa.selftest=corrupt)
#   --timeout SECS         kill QEMU after SECS (default 120)
#   --qemu-pidfile FILE    QEMU writes its pid to FILE (-pidfile; removed when
#                          QEMU exits normally)
#   --initramfs-dir DIR    where build-initramfs.sh puts its output
#                          (default tests/guest/out; built on demand)
# env:  QEMU=qemu-system-x86_64, QEMU_EXTRA="extra qemu args"
#
# The guest console goes to stdout.  Exit status: 0 if the guest printed
# "UVDPA-GUEST-RESULT: PASS ...", 1 on FAIL, 2 on timeout / no result line
# (3 on usage errors).  A result line printed before a timeout still counts.
# Console lines are passed on as they arrive (no block buffering).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 3; }
die() { echo "run-guest: $*" >&2; exit 3; }

sock="" drive="" queues=1 smp=1 timeout_s=120 initrd_dir="$here/out"
mode=verify seed="" count="" bs="" secs="" append="" reconnect="" pidfile=""
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || { [[ "$1" == -h || "$1" == --help ]] && usage; die "missing value for $1"; }
    case "$1" in
        --vhost-user-blk) sock="$2" ;;
        --drive) drive="$2" ;;
        --queues) queues="$2" ;;
        --smp) smp="$2" ;;
        --mode) mode="$2" ;;
        --seed) seed="$2" ;;
        --count) count="$2" ;;
        --bs) bs="$2" ;;
        --secs) secs="$2" ;;
        --reconnect) reconnect="$2" ;;
        --qemu-pidfile) pidfile="$2" ;;
        --append) append="$2" ;;
        --timeout) timeout_s="$2" ;;
        --initramfs-dir) initrd_dir="$2" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[[ -n "$sock" || -n "$drive" ]] || die "need --vhost-user-blk SOCK or --drive FILE"
[[ -z "$sock" || -z "$drive" ]] || die "--vhost-user-blk and --drive are exclusive"
for v in "$queues" "$smp" "$timeout_s" ${reconnect:+"$reconnect"}; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "bad number: $v"
done
[[ -z "$reconnect" || -n "$sock" ]] || die "--reconnect needs --vhost-user-blk"

"$here/build-initramfs.sh" "$initrd_dir" > /dev/null
kernel="$initrd_dir/kernel"
initrd="$initrd_dir/initramfs.cpio.gz"

cmdline="console=ttyS0 panic=-1 quiet uvdpa.mode=$mode"
[[ -z "$seed" ]] || cmdline+=" uvdpa.seed=$seed"
[[ -z "$count" ]] || cmdline+=" uvdpa.count=$count"
[[ -z "$bs" ]] || cmdline+=" uvdpa.bs=$bs"
[[ -z "$secs" ]] || cmdline+=" uvdpa.secs=$secs"
[[ -z "$append" ]] || cmdline+=" $append"

# Guest RAM is a shared memfd so a vhost-user backend can map it
# (without share=on the backend sees no guest writes and the guest hangs).
# shellcheck disable=SC2054 # commas are QEMU's
args=(-accel tcg -cpu max -smp "$smp" -nodefaults -no-reboot -display none -serial stdio
      -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem -m 256M
      -kernel "$kernel" -initrd "$initrd" -append "$cmdline")
[[ -z "$pidfile" ]] || args+=(-pidfile "$pidfile")
if [[ -n "$sock" ]]; then
    if [[ -n "$reconnect" ]]; then
        # QEMU retries in the background; the socket may appear later
        chardev="socket,id=c0,path=${sock//,/,,},reconnect=$reconnect"
    else
        [[ -S "$sock" ]] || die "$sock is not a socket"
        chardev="socket,id=c0,path=${sock//,/,,}"
    fi
    args+=(-chardev "$chardev" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
else
    [[ -f "$drive" ]] || die "$drive is not a file"
    # QEMU option values escape ',' by doubling it
    args+=(-drive "file=${drive//,/,,},if=none,id=d0,format=raw,cache=none"
           -device "virtio-blk-pci,drive=d0,num-queues=$queues")
fi
# shellcheck disable=SC2206 # QEMU_EXTRA is split on purpose
[[ -z "${QEMU_EXTRA:-}" ]] || args+=(${QEMU_EXTRA})

log="$(mktemp "${TMPDIR:-/tmp}/uvdpa-guest.XXXXXX")"
trap 'rm -f "$log"' EXIT
start=$(date +%s.%N)
set +e
# stdin from /dev/null: QEMU must not grab (or stop on) the caller's tty
# (console CRLF -> LF, unbuffered, so callers can grep lines as they come)
timeout -k 5 "$timeout_s" "${QEMU:-qemu-system-x86_64}" "${args[@]}" < /dev/null 2>&1 |
    sed -u 's/\r$//' | tee "$log"
rc=("${PIPESTATUS[@]}")
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

result="$(grep -m1 '^UVDPA-GUEST-RESULT: ' "$log" || true)"
if [[ "${rc[0]}" == 124 || "${rc[0]}" == 137 ]]; then
    # a result line printed before the timeout still counts (guest hung in poweroff)
    echo "run-guest: TIMEOUT after ${timeout_s}s" >&2
fi
case "$result" in
    "UVDPA-GUEST-RESULT: PASS"*) echo "run-guest: PASS in ${elapsed}s" >&2; exit 0 ;;
    "UVDPA-GUEST-RESULT: FAIL"*) echo "run-guest: FAIL in ${elapsed}s" >&2; exit 1 ;;
    *) echo "run-guest: no result line (qemu exit ${rc[0]}, ${elapsed}s)" >&2; exit 2 ;;
esac
