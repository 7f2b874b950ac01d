#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for the `rbd` backend's tests and examples: one
# monitor (messenger v1 on 127.0.0.1 only: v2 makes the OSD look for an IPv6 address), one
# OSD on BlueStore over a sparse 16 GiB file (so a killed and restarted OSD keeps every
# acknowledged write; memstore would lose them) with small RocksDB memtables (16 MiB, not
# 256: the default's write-ahead log alone fills a small device and stops the OSD), cephx
# with an admin keyring, a pool `rbd` initialised for RBD; no manager (RBD does not need
# one). Everything lives under one directory (default /tmp/uvdpa-ceph): config, keyrings,
# data, logs, pid files.
#
#   scripts/ceph.sh start [DIR]   start the cluster (a running one in DIR is stopped first)
#   scripts/ceph.sh stop [DIR]    stop it and delete DIR
#   scripts/ceph.sh env [DIR]     print `export CEPH_CONF=...` for the ceph/rbd tools
#   scripts/ceph.sh osd-stop [DIR]   stop the OSD (SIGTERM) and wait until it has exited
#   scripts/ceph.sh osd-start [DIR]  start it again and wait until it is up
#
# Needs Debian 12's ceph-mon, ceph-osd and ceph-common (scripts/install-deps.sh). The
# daemons run as the calling user; nothing outside DIR is touched. Sized for a small
# machine: one OSD shard with two threads, a low memory target.
set -euo pipefail

cmd=${1:-}
dir=${2:-/tmp/uvdpa-ceph}
conf="$dir/ceph.conf"

die() {
    echo "ceph.sh: $*" >&2
    exit 1
}

stop() {
    local f pid
    for f in "$dir"/run/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for f in "$dir"/run/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        for _ in $(seq 50); do
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to $1 seconds for `$2...` to succeed.
wait_for() {
    local secs=$1
    shift
    for _ in $(seq $((secs * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

osd_up() {
    timeout 10 ceph -c "$conf" --connect-timeout 5 osd dump --format json 2>/dev/null | grep -q '"up":1'
}

start() {
    for b in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd uuidgen; do
        command -v "$b" >/dev/null || die "$b not found (run scripts/install-deps.sh)"
    done
    [ -e "$conf" ] && stop
    mkdir -p "$dir"/{run,log,mon,osd}
    local fsid port osd_uuid osd_key t0
    t0=$(date +%s%N)
    fsid=$(uuidgen)
    osd_uuid=$(uuidgen)
    port=$(free_port)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
ms bind msgr2 = false
ms bind ipv6 = false
ms bind ipv4 = true
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 17179869184
bluestore rocksdb options annex = write_buffer_size=16777216,max_write_buffer_number=2,max_total_wal_size=67108864
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
bluestore cache autotune = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd memory target = 536870912
osd op num shards = 1
osd op num threads per shard = 2
ms async op threads = 1
bluestore cache size = 67108864
[mon]
keyring = $dir/mon.keyring
[osd]
keyring = $dir/osd/\$name/keyring
[client]
keyring = $dir/admin.keyring
EOF
    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    ceph-mon -c "$conf" -i a
    wait_for 30 timeout 10 ceph -c "$conf" --connect-timeout 5 mon stat ||
        die "the monitor did not answer within 30 s; see $dir/log/mon.a.log"

    osd_key=$(ceph-authtool --gen-print-key)
    local id
    id=$(echo "{\"cephx_secret\": \"$osd_key\"}" |
        timeout 30 ceph -c "$conf" osd new "$osd_uuid" -i -) || die "ceph osd new failed"
    mkdir -p "$dir/osd/osd.$id"
    ceph-authtool --create-keyring "$dir/osd/osd.$id/keyring" --name "osd.$id" \
        --add-key "$osd_key" >/dev/null
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.log" 2>&1 ||
        die "ceph-osd --mkfs failed; see $dir/log/osd-mkfs.log"
    ceph-osd -c "$conf" -i "$id"
    wait_for 60 osd_up || die "osd.$id did not come up within 60 s; see $dir/log/osd.$id.log"

    timeout 60 ceph -c "$conf" osd pool create rbd 8 8 >/dev/null
    timeout 60 rbd -c "$conf" pool init rbd
    local ms=$((($(date +%s%N) - t0) / 1000000))
    echo "ceph.sh: cluster $fsid up in $((ms / 1000)).$(printf %03d $((ms % 1000))) s (mon 127.0.0.1:$port, osd.$id, pool rbd); CEPH_CONF=$conf"
}

osd_stop() {
    local f=$dir/run/osd.0.pid pid
    [ -e "$f" ] || die "no OSD running in $dir"
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "osd.0 (pid $pid) did not stop within 30 s"
}

osd_start() {
    [ -e "$conf" ] || die "no cluster in $dir"
    ceph-osd -c "$conf" -i 0
    wait_for 60 osd_up || die "osd.0 did not come up within 60 s; see $dir/log/osd.0.log"
}

case "$cmd" in
start) start ;;
stop) stop ;;
osd-stop) osd_stop ;;
osd-start) osd_start ;;
env) echo "export CEPH_CONF=$conf" ;;
*) die "usage: $0 start|stop|env|osd-stop|osd-start [DIR]" ;;
esac
