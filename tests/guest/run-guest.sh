#!/usr/bin/env bash
# Boot the uvdpa test guest under QEMU (TCG) and report its result.
#
# usage: run-guest.sh (--vhost-user-blk SOCK | --drive FILE) [options]
#        run-guest.sh (--vhost-user-net SOCK | --tap-net IFNAME)... [options]
#   --vhost-user-blk SOCK  attach a vhost-user-blk device served on SOCK (repeatable:
#                          the disks appear as vda, vdb, ... in the order given)
#   --reconnect SECS       with --vhost-user-blk/-net: chardev reconnect=SECS, so
#                          QEMU (re)connects in the background, retrying every
#                          SECS; SOCK need not exist yet and the backend may restart
#   --drive FILE           use QEMU's own virtio-blk on a raw FILE (self-test)
#   --queues N             virtqueues of the blk devices (num-queues=N, default 1)
#   --queue-size N         queue-size=N on the blk devices (QEMU's default: 128)
#   --no-indirect          indirect_desc=off on the blk devices
#   --no-event-idx         event_idx=off on the blk devices
#   --host-root            share the host's / read-only over virtio-9p (mount tag
#                          hostroot; the guest mounts it at /host and runs host
#                          binaries such as mkfs.ext4 and fio there)
#   --mem MIB              guest RAM in MiB (default 256)
#   --vhost-user-net SOCK  attach a virtio-net device whose backend is the
#                          vhost-user-net server on SOCK (repeatable: one NIC each)
#   --tap-net IFNAME       attach a virtio-net device on QEMU's own tap backend
#                          (-netdev tap,ifname=IFNAME,script=no,downscript=no;
#                          QEMU creates the tap if it does not exist; repeatable).
#                          NICs appear in the guest as eth0, eth1, ... in the
#                          order of the --vhost-user-net/--tap-net options
#   --net-mac MAC          MAC of the next NIC (the i-th --net-mac goes to the
#                          i-th NIC; default: QEMU's 52:54:00:12:34:56 + index)
#   --net-queues Q         queue pairs of every NIC (default 1; Q > 1 adds
#                          queues=Q to the netdev and mq=on to the device)
#   --net-host-mtu N       host_mtu=N on every NIC (VIRTIO_NET_F_MTU: the guest
#                          takes its MTU from QEMU's config space)
#   --packed               packed virtqueues: packed=on on every virtio device
#                          (blk and net; used only if the backend offers it)
#   --smp N                guest vCPUs (default 1)
#   --mode verify|write|read|loop|matrix|migrate|ping|responder, --seed N, --count N, --bs BYTES,
#   --secs N               passed to the guest as uvdpa.* (see ./init)
#   --append STR           extra kernel command line (e.g. uvdpa.selftest=corrupt,
#                          or "uvdpa.ip=10.77.0.2/24 uvdpa.peer=10.77.0.1")
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

socks=() drive="" queues=1 mem=256 blkprops="" hostroot="" smp=1 timeout_s=120 initrd_dir="$here/out"
mode=verify seed="" count="" bs="" secs="" append="" reconnect="" pidfile=""
nets=() macs=() net_queues=1 packed="" netprops=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage ;;
        --packed) packed=",packed=on"; shift; continue ;;
        --no-indirect) blkprops+=",indirect_desc=off"; shift; continue ;;
        --no-event-idx) blkprops+=",event_idx=off"; shift; continue ;;
        --host-root) hostroot=1; shift; continue ;;
    esac
    [[ $# -ge 2 ]] || die "missing value for $1"
    case "$1" in
        --vhost-user-blk) socks+=("$2") ;;
        --vhost-user-net) nets+=("vu:$2") ;;
        --tap-net) nets+=("tap:$2") ;;
        --net-mac) macs+=("$2") ;;
        --net-queues) net_queues="$2" ;;
        --net-host-mtu) [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "bad number: $2"
                        netprops+=",host_mtu=$2" ;;
        --drive) drive="$2" ;;
        --queues) queues="$2" ;;
        --queue-size) [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "bad number: $2"
                      blkprops+=",queue-size=$2" ;;
        --mem) mem="$2" ;;
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
[[ ${#socks[@]} -gt 0 || -n "$drive" || ${#nets[@]} -gt 0 ]] ||
    die "need --vhost-user-blk SOCK, --drive FILE, --vhost-user-net SOCK or --tap-net IFNAME"
[[ ${#socks[@]} -eq 0 || -z "$drive" ]] || die "--vhost-user-blk and --drive are exclusive"
for v in "$queues" "$smp" "$timeout_s" "$net_queues" "$mem" ${reconnect:+"$reconnect"}; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "bad number: $v"
done
[[ -z "$reconnect" || ${#socks[@]} -gt 0 || " ${nets[*]} " == *" vu:"* ]] ||
    die "--reconnect needs --vhost-user-blk or --vhost-user-net"
[[ ${#macs[@]} -le ${#nets[@]} ]] || die "more --net-mac than NICs"
for m in ${macs[@]+"${macs[@]}"}; do
    [[ "$m" =~ ^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$ ]] || die "bad MAC: $m"
done

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
      -object memory-backend-memfd,id=mem,size="$mem"M,share=on -numa node,memdev=mem -m "$mem"M
      -kernel "$kernel" -initrd "$initrd" -append "$cmdline")
[[ -z "$pidfile" ]] || args+=(-pidfile "$pidfile")
# vu_chardev ID SOCK: the -chardev value for a vhost-user socket
vu_chardev() {
    if [[ -n "$reconnect" ]]; then
        # QEMU retries in the background; the socket may appear later
        echo "socket,id=$1,path=${2//,/,,},reconnect=$reconnect"
    else
        [[ -S "$2" ]] || die "$2 is not a socket"
        echo "socket,id=$1,path=${2//,/,,}"
    fi
}
for i in "${!socks[@]}"; do
    # c0 is the first disk's chardev (callers' logs name it)
    chardev="$(vu_chardev "c$i" "${socks[$i]}")"
    args+=(-chardev "$chardev"
           -device "vhost-user-blk-pci,chardev=c$i,num-queues=$queues$packed$blkprops")
done
if [[ -n "$drive" ]]; then
    [[ -f "$drive" ]] || die "$drive is not a file"
    # QEMU option values escape ',' by doubling it
    args+=(-drive "file=${drive//,/,,},if=none,id=d0,format=raw,cache=none,discard=unmap"
           -device "virtio-blk-pci,drive=d0,num-queues=$queues$packed$blkprops")
fi
if [[ -n "$hostroot" ]]; then
    # the host's / read-only over virtio-9p; multidevs=remap keeps inode numbers of
    # different host filesystems (/, /dev, /proc, ...) apart
    args+=(-fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
           -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot)
fi
# NICs.  vectors=0 (legacy INTx, no MSI-X): QEMU 7.2 under TCG crashes when a
# virtio-net-pci with a vhost-user backend uses MSI-X, and QEMU's own tap NICs
# get the same setting so the self-test runs the guest driver the same way.
mq=""
[[ "$net_queues" == 1 ]] || mq=",mq=on"
for i in "${!nets[@]}"; do
    kind="${nets[$i]%%:*}" val="${nets[$i]#*:}"
    case "$kind" in
        vu)
            chardev="$(vu_chardev "cn$i" "$val")"
            args+=(-chardev "$chardev" -netdev "vhost-user,id=n$i,chardev=cn$i,queues=$net_queues") ;;
        tap)
            [[ "$val" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad interface name: $val"
            netdev="tap,id=n$i,ifname=$val,script=no,downscript=no"
            [[ "$net_queues" == 1 ]] || netdev+=",queues=$net_queues"
            args+=(-netdev "$netdev") ;;
    esac
    args+=(-device "virtio-net-pci,netdev=n$i,vectors=0${macs[$i]:+,mac=${macs[$i]}}$mq$packed$netprops")
done
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
