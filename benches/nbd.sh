#!/usr/bin/env bash
# NBD benchmark: uvdpa `backend nbd` vs qemu-storage-daemon `--blockdev driver=nbd`, both
# clients of the same nbdkit `memory` export over a unix socket (so the server costs the
# same for both), same libblkio client (uvdpa-blkbench, one queue). The export is written
# once (prefill) so reads return data. Servers run one at a time, alternating, REPS times;
# the median IOPS of each row is reported with the uvdpa/qsd ratio (benches/lib/vs-qsd.sh).
# Output: Markdown on stdout, also written to benches/results/nbd-<date>.md.
#
# Knobs: those of benches/lib/vs-qsd.sh, SIZE_MB [1024] export size, NBDKIT_THREADS [16],
# UVDPA_POLL_US [the daemon's default].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=nbd
SIZE_MB=${SIZE_MB:-1024}
NBDKIT_THREADS=${NBDKIT_THREADS:-16}
# shellcheck source=lib/vs-qsd.sh
. "$ROOT/benches/lib/vs-qsd.sh"
command -v nbdkit >/dev/null || die "nbdkit not found (scripts/install-deps.sh)"
vs_qsd_build

WORK=$(mktemp -d /var/tmp/uvdpa-nbd-bench.XXXXXX)
NBD_SOCK=$WORK/nbdkit.sock
NBDKIT_PID=""
cleanup() {
    stop
    [[ -n $NBDKIT_PID ]] && kill "$NBDKIT_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

nbdkit --foreground --unix "$NBD_SOCK" --threads "$NBDKIT_THREADS" --exportname bench \
    memory "${SIZE_MB}M" >"$WORK/nbdkit.log" 2>&1 &
NBDKIT_PID=$!
for _ in $(seq 200); do
    [[ -S $NBD_SOCK ]] && break
    sleep 0.05
done
[[ -S $NBD_SOCK ]] || die "nbdkit did not start: $(cat "$WORK/nbdkit.log")"

start_uvdpa() {
    start_uvdpa_with "backend = \"nbd\"
uri = \"nbd+unix:///bench?socket=$NBD_SOCK\""
}

start_qsd() {
    SOCK=$WORK/qsd.sock
    start qsd "$SOCK" "$QSD" \
        --blockdev "driver=nbd,node-name=n0,server.type=unix,server.path=$NBD_SOCK,export=bench" \
        --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1"
}

report_header() {
    echo "- server: nbdkit $(nbdkit --version | awk '{ print $2 }') \`memory ${SIZE_MB}M\`, --threads $NBDKIT_THREADS, unix socket, prefilled"
    echo "- qsd: \`--blockdev driver=nbd,server.type=unix,server.path=SOCK,export=bench\` (QEMU's NBD client, one connection)"
    echo "- uvdpa: \`backend nbd\`, one connection, queue_size 256, poll_us ${UVDPA_POLL_US:-default}"
}

vs_qsd_prefill
vs_qsd_run
