#!/usr/bin/env bash
# RBD benchmark: uvdpa `backend rbd` vs qemu-storage-daemon `--blockdev driver=rbd`, on the
# same image of a single-node Ceph cluster (scripts/ceph.sh), same libblkio client
# (uvdpa-blkbench, one queue). The image is written once (prefill) so reads hit real
# objects. Servers run one at a time, alternating, REPS times; the median IOPS of each
# row is reported with the uvdpa/qsd ratio. Output: Markdown on stdout, also written to
# benches/results/rbd-<date>.md.
#
# The OSD and the monitor share the machine with the server and the client (no CPU
# pinning: on 2 CPUs it would starve the OSD), so absolute figures are this machine's
# Ceph's; the ratio is the comparison.
#
# Knobs: RUNTIME [10] seconds per run, RAMP [1], REPS [3], SIZE_MB [1024] image size,
# WORKLOADS ["randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:1M:8
# write:1M:8"], UVDPA_POLL_US [the daemon's default], SKIP_BUILD [0], QSD [qemu-storage-daemon] (needs qemu-block-extra for
# its rbd driver: scripts/install-deps.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
REPS=${REPS:-3}
SIZE_MB=${SIZE_MB:-1024}
WORKLOADS=${WORKLOADS:-"randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:1M:8 write:1M:8"}
SKIP_BUILD=${SKIP_BUILD:-0}
QSD=${QSD:-qemu-storage-daemon}
UVDPA=$ROOT/target/release/uvdpa
BENCH=$ROOT/target/release/uvdpa-blkbench
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benches/results}

log() { printf '[rbd.sh] %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

command -v "$QSD" >/dev/null || die "$QSD not found (scripts/install-deps.sh)"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building uvdpa and uvdpa-blkbench (release)"
    (cd "$ROOT" && cargo build --release -q -p uvdpa-daemon -p uvdpa-blkbench) || die "build failed"
fi

WORK=$(mktemp -d /var/tmp/uvdpa-rbd-bench.XXXXXX)
CEPH_DIR=$WORK/ceph
SERVER_PID=""
cleanup() {
    declare -F stop >/dev/null && stop
    "$ROOT/scripts/ceph.sh" stop "$CEPH_DIR" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$ROOT/scripts/ceph.sh" start "$CEPH_DIR" >&2 || die "the Ceph cluster did not start"
CONF=$CEPH_DIR/ceph.conf
rbd -c "$CONF" create --size "${SIZE_MB}M" rbd/bench

start() { # start NAME SOCK CMD...: run a server until its socket exists
    local name=$1 sock=$2
    shift 2
    rm -f "$sock"
    "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        [[ -S $sock ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    sed 's/^/    /' "$WORK/$name.log" >&2
    die "$name did not start"
}

stop() { # SIGTERM, SIGKILL after 10 s (a server stuck on a dead OSD), reap
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID
    SERVER_PID=""
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

start_uvdpa() { # start_uvdpa SOCK_VAR
    mkdir -p "$WORK/uvdpa.run"
    cat >"$WORK/uvdpa.toml" <<EOF
[[device]]
name = "bench0"
mgmtdev = "blk"
backend = "rbd"
pool = "rbd"
image = "bench"
conf = "$CONF"
queues = 1
queue_size = 256
${UVDPA_POLL_US:+poll_us = $UVDPA_POLL_US}
EOF
    SOCK=$WORK/uvdpa.run/bench0.sock
    start uvdpa "$SOCK" "$UVDPA" daemon --run-dir "$WORK/uvdpa.run" --config "$WORK/uvdpa.toml"
}

start_qsd() {
    SOCK=$WORK/qsd.sock
    start qsd "$SOCK" "$QSD" \
        --blockdev "driver=rbd,node-name=r0,pool=rbd,image=bench,conf=$CONF,user=admin" \
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1"
}

start_uvdpa
log "prefilling the image (${SIZE_MB} MiB, sequential 1 MiB writes)"
"$BENCH" --path "$SOCK" --rw fill --bs 1048576 --iodepth 8 >/dev/null || die "prefill failed"
stop

declare -A IOPS FAILS
for ((rep = 1; rep <= REPS; rep++)); do
    for target in uvdpa qsd; do
        # Alternate which goes first, so drift hits both alike.
        ((rep % 2 == 0)) && target=$([[ $target == uvdpa ]] && echo qsd || echo uvdpa)
        "start_$target"
        for wl in $WORKLOADS; do
            IFS=: read -r rw bs qd <<<"$wl"
            case $bs in *k) b=$((${bs%k} * 1024)) ;; *M) b=$((${bs%M} * 1048576)) ;; *) b=$bs ;; esac
            if ! out=$("$BENCH" --path "$SOCK" --rw "$rw" --bs "$b" --iodepth "$qd" \
                --runtime "$RUNTIME" --ramp "$RAMP" 2>"$WORK/client.err"); then
                log "rep $rep $target $wl failed: $(cat "$WORK/client.err")"
                FAILS[$target|$wl]+="rep$rep "
                # A stuck server is restarted for the next workload.
                stop
                "start_$target"
                continue
            fi
            iops=$(sed -n 's/.*"iops":\([0-9.e+]*\).*/\1/p' <<<"$out")
            log "rep $rep $target $wl: $iops IOPS"
            IOPS[$target|$wl]+="$iops "
        done
        stop
    done
done

median() { tr ' ' '\n' <<<"$*" | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p "$RESULTS_DIR"
OUT=$RESULTS_DIR/rbd-$STAMP.md
{
    echo "# uvdpa rbd vs qemu-storage-daemon rbd, $STAMP"
    echo
    echo "- cluster: scripts/ceph.sh (one monitor, one BlueStore OSD on a file in /var/tmp), image ${SIZE_MB} MiB, prefilled"
    echo "- client: uvdpa-blkbench (libblkio, 1 queue), ${RUNTIME}s per run after ${RAMP}s ramp, median of $REPS reps, servers alternating"
    echo "- qsd: $("$QSD" --version | head -n1); \`--blockdev driver=rbd,pool=rbd,image=bench,conf=CONF,user=admin\` (default cache: librbd cache on, as uvdpa)"
    echo "- uvdpa: $(git -C "$ROOT" rev-parse --short HEAD); \`backend rbd\`, queue_size 256, poll_us ${UVDPA_POLL_US:-default}, librbd defaults"
    echo "- machine: $(nproc) CPUs, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| workload | QD | uvdpa IOPS | qsd IOPS | uvdpa/qsd |"
    echo "|---|---:|---:|---:|---:|"
    for wl in $WORKLOADS; do
        IFS=: read -r rw bs qd <<<"$wl"
        u=$(median ${IOPS[uvdpa|$wl]:-0})
        q=$(median ${IOPS[qsd|$wl]:-0})
        note=""
        for t in uvdpa qsd; do
            [[ -n ${FAILS[$t|$wl]:-} ]] && note+=" ($t failed: ${FAILS[$t|$wl]% }; median of the other runs)"
        done
        awk -v rw="$rw" -v bs="$bs" -v qd="$qd" -v u="$u" -v q="$q" -v note="$note" \
            'BEGIN { printf "| %s %s | %s | %.0f | %.0f | %.2fx%s |\n", rw, bs, qd, u, q, (q > 0 ? u / q : 0), note }'
    done
} | tee "$OUT"
log "report written to $OUT"
