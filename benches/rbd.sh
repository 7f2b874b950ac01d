#!/usr/bin/env bash
# RBD benchmark: uvdpa `backend rbd` vs qemu-storage-daemon `--blockdev driver=rbd`, on the
# same image of a single-node Ceph cluster (scripts/ceph.sh), same libblkio client
# (uvdpa-blkbench, one queue). The image is written once (prefill) so reads hit real
# objects. Servers run one at a time, alternating, REPS times; the median IOPS of each
# row is reported with the uvdpa/qsd ratio (benches/lib/vs-qsd.sh). Output: Markdown on
# stdout, also written to benches/results/rbd-<date>.md.
#
# The OSD and the monitor share the machine with the server and the client (no CPU
# pinning: on 2 CPUs it would starve the OSD), so absolute figures are this machine's
# Ceph's; the ratio is the comparison.
#
# Knobs: those of benches/lib/vs-qsd.sh, SIZE_MB [1024] image size, UVDPA_POLL_US [the
# daemon's default]. qsd needs qemu-block-extra for its rbd driver (scripts/install-deps.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=rbd
SIZE_MB=${SIZE_MB:-1024}
# shellcheck source=lib/vs-qsd.sh
. "$ROOT/benches/lib/vs-qsd.sh"
vs_qsd_build

WORK=$(mktemp -d /var/tmp/uvdpa-rbd-bench.XXXXXX)
CEPH_DIR=$WORK/ceph
cleanup() {
    stop
    "$ROOT/scripts/ceph.sh" stop "$CEPH_DIR" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$ROOT/scripts/ceph.sh" start "$CEPH_DIR" >&2 || die "the Ceph cluster did not start"
CONF=$CEPH_DIR/ceph.conf
rbd -c "$CONF" create --size "${SIZE_MB}M" rbd/bench

start_uvdpa() {
    start_uvdpa_with "backend = \"rbd\"
pool = \"rbd\"
image = \"bench\"
conf = \"$CONF\""
}

start_qsd() {
    SOCK=$WORK/qsd.sock
    start qsd "$SOCK" "$QSD" \
        --blockdev "driver=rbd,node-name=r0,pool=rbd,image=bench,conf=$CONF,user=admin" \
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1"
}

report_header() {
    echo "- cluster: scripts/ceph.sh (one monitor, one BlueStore OSD on a file in /var/tmp), image ${SIZE_MB} MiB, prefilled"
    echo "- qsd: \`--blockdev driver=rbd,pool=rbd,image=bench,conf=CONF,user=admin\` (default cache: librbd cache on, as uvdpa)"
    echo "- uvdpa: \`backend rbd\`, queue_size 256, poll_us ${UVDPA_POLL_US:-default}, librbd defaults"
}

vs_qsd_prefill
vs_qsd_run
