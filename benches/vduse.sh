#!/usr/bin/env bash
# VDUSE block benchmark: fio in one 6.12 guest (tests/guest/vduse, TCG) against
#   qsd-null    qemu-storage-daemon's vduse-blk export, null-co (read-zeroes=on)
#   qsd-tmpfs   qemu-storage-daemon's vduse-blk export, a file image in the guest's tmpfs
#   null_blk    the kernel's null_blk (the block layer's ceiling, no virtio)
#   uvdpa-null  uvdpa over VDUSE, backend "null"      (may fail until the transport lands)
#   uvdpa-ram   uvdpa over VDUSE, backend "ram"
# Workloads: 4 KiB randread QD1, randread QD32, randwrite QD32 (libaio, O_DIRECT).
#
# usage: benches/vduse.sh
# env:   SECS=10 (per run)  REPS=3  TARGETS="qsd-null qsd-tmpfs null_blk uvdpa-null uvdpa-ram"
#        UVDPA_BIN=target/release/uvdpa   SMP=2  MEM=2048 (MiB)
# Output: benches/results/vduse-<timestamp>.md (median IOPS, p50/p99 completion latency of
# the reps, uvdpa/qsd ratios) and the raw fio JSON next to it. A target that fails to come
# up is marked failed in the table; the others still run. TCG numbers compare the
# implementations with each other, not with hardware.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${SECS:-10}" reps="${REPS:-3}"
targets="${TARGETS:-qsd-null qsd-tmpfs null_blk uvdpa-null uvdpa-ram}"
uvdpa_bin="${UVDPA_BIN:-$repo/target/release/uvdpa}"
[[ "$uvdpa_bin" == /* ]] || uvdpa_bin="$repo/$uvdpa_bin"
command -v python3 > /dev/null || { echo "vduse-bench: python3 is needed for the report" >&2; exit 1; }

stamp="$(date +%Y%m%d-%H%M%S)"
results="$repo/benches/results"
raw="$results/vduse-$stamp"
mkdir -p "$raw"
report="$results/vduse-$stamp.md"

guest_script="$(mktemp "${TMPDIR:-/tmp}/uvdpa-vduse-bench.XXXXXX")"
trap 'rm -f "$guest_script"' EXIT
cat > "$guest_script" << 'GUEST'
# runs in the guest (sh); SECS, REPS, TARGETS, UVDPA_BIN come from run.sh --env
set -u
. "$UVDPA_LIB"
load_vduse_modules blk || die "loading the VDUSE modules"
O=/out
pids=""

failed() { say "target $1 FAILED: $2"; echo "$2" > "$O/$1.failed"; }

# wait for a vd* disk to appear; sets dev to its name
wait_vd() {
    end=$(($(date +%s) + 30))
    while ! first_virtio_disk > /dev/null; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.1
    done
    dev="$(first_virtio_disk)"
}

# teardown of a VDUSE target: vdpa dev del, then the daemon
vduse_down() {
    [ ! -e "/sys/bus/vdpa/devices/$1" ] || vdpa_del "$1" 40 || say "vdpa dev del $1 failed"
    kill -TERM $pids 2> /dev/null
    end=$(($(date +%s) + 15))
    for p in $pids; do
        while kill -0 "$p" 2> /dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.1; done
        kill -9 "$p" 2> /dev/null
    done
    pids=""
}

qsd_up() {  # qsd_up NAME BLOCKDEV-OPTIONS; sets dev (and pids)
    qemu-storage-daemon --blockdev "$2" \
        --export "type=vduse-blk,id=e0,node-name=n0,name=$1,writable=on,num-queues=1" \
        > "$O/$1.log" 2>&1 &
    pids=$!
    wait_path "/dev/vduse/$1" 20 $pids || return 1
    vdpa_add "$1" || return 1
    wait_vd
}

# --- uvdpa over VDUSE -------------------------------------------------------------------
# UVDPA: starts `uvdpa daemon` with one [[device]] (transport "vduse") and binds it with
# `vdpa dev add` unless the daemon did that itself. Sets dev to the disk name (and pids).
uvdpa_up() {  # uvdpa_up BACKEND
    mkdir -p /tmp/uvdpa
    {
        echo '[[device]]'
        echo 'name = "uvdpa0"'
        echo 'mgmtdev = "blk"'
        echo "backend = \"$1\""
        echo 'size = "1G"'
        echo 'transport = "vduse"'
        # UVDPA_TUNING: extra [[device]] lines (e.g. "poll_us = 0"), for the tuned table
        [ -z "${UVDPA_TUNING:-}" ] || printf '%s\n' "$UVDPA_TUNING"
    } > /tmp/uvdpa.toml
    [ -x "$UVDPA_BIN" ] || { say "no $UVDPA_BIN (cargo build --release)"; return 1; }
    "$UVDPA_BIN" daemon --run-dir /tmp/uvdpa --config /tmp/uvdpa.toml > "$O/uvdpa-$1.log" 2>&1 &
    pids=$!
    wait_path /dev/vduse/uvdpa0 20 $pids || return 1
    sleep 0.5
    [ -e /sys/bus/vdpa/devices/uvdpa0 ] || vdpa_add uvdpa0 || return 1
    wait_vd
}

# run_fio TARGET DEV
run_fio() {
    for wl in "randread 1" "randread 32" "randwrite 32"; do
        set -- "$1" "$2" $wl
        rep=1
        while [ "$rep" -le "$REPS" ]; do
            deadline $((SECS + 60)) fio --name=b --filename="/dev/$2" --direct=1 --ioengine=libaio \
                --rw="$3" --bs=4k --iodepth="$4" --time_based --runtime="$SECS" --size=512M \
                --output-format=json --output="$O/$1.$3-qd$4.$rep.json" > /dev/null 2>&1 ||
                { failed "$1" "fio $3 QD$4 rep $rep"; return 1; }
            rep=$((rep + 1))
        done
        say "$1: $3 QD$4 done"
    done
}

for t in $TARGETS; do
    say "target $t"
    case "$t" in
        qsd-null)
            qsd_up qsd0 driver=null-co,node-name=n0,size=1073741824,read-zeroes=on ||
                { failed "$t" "qsd did not come up"; vduse_down qsd0; continue; }
            run_fio "$t" "$dev"; vduse_down qsd0 ;;
        qsd-tmpfs)
            truncate -s 1G /tmp/img
            qsd_up qsd0 driver=file,node-name=n0,filename=/tmp/img,aio=threads ||
                { failed "$t" "qsd did not come up"; vduse_down qsd0; continue; }
            run_fio "$t" "$dev"; vduse_down qsd0; rm -f /tmp/img ;;
        null_blk)
            load_modules "null_blk nr_devices=1 gb=1" && wait_blockdev nullb0 10 ||
                { failed "$t" "null_blk not available"; continue; }
            run_fio "$t" nullb0 ;;
        uvdpa-null | uvdpa-ram)
            uvdpa_up "${t#uvdpa-}" ||
                { failed "$t" "uvdpa over VDUSE did not come up (see uvdpa-${t#uvdpa-}.log)"; vduse_down uvdpa0; continue; }
            run_fio "$t" "$dev"; vduse_down uvdpa0 ;;
        *) failed "$t" "unknown target" ;;
    esac
done
exit 0
GUEST

n_targets=$(wc -w <<< "$targets")
timeout_s=$(( 120 + n_targets * (60 + 3 * reps * (secs + 15)) ))
echo "vduse-bench: $targets; ${secs}s x $reps reps; timeout ${timeout_s}s; raw results in $raw" >&2
set +e
"$repo/tests/guest/vduse/run.sh" --script "$guest_script" --out "$raw" --timeout "$timeout_s" \
    --smp "${SMP:-2}" --mem "${MEM:-2048}" \
    --env "SECS=$secs" --env "REPS=$reps" --env "TARGETS=$targets" --env "UVDPA_BIN=$uvdpa_bin" --env "UVDPA_TUNING=${UVDPA_TUNING:-}" |
    tee "$raw/console.log"
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 0 ]] || echo "vduse-bench: the guest run ended with status $rc (partial results)" >&2

python3 - "$raw" "$report" "$targets" "$secs" "$reps" << 'PY'
import json, os, statistics, subprocess, sys
raw, report, targets, secs, reps = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4], sys.argv[5]
wls = [("randread", 1), ("randread", 32), ("randwrite", 32)]
peer = {"uvdpa-null": "qsd-null", "uvdpa-ram": "qsd-tmpfs"}

def load(t, rw, qd):
    out = []
    for r in range(1, 100):
        p = os.path.join(raw, f"{t}.{rw}-qd{qd}.{r}.json")
        if not os.path.exists(p):
            break
        try:
            j = json.load(open(p))["jobs"][0]["read" if rw == "randread" else "write"]
        except (ValueError, KeyError, IndexError):
            continue
        pct = j.get("clat_ns", {}).get("percentile", {})
        out.append((j["iops"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000))
    if not out:
        return None
    return tuple(statistics.median(x[i] for x in out) for i in range(3)) + (len(out),)

res = {(t, rw, qd): load(t, rw, qd) for t in targets for rw, qd in wls}
kver = ""
try:
    kver = open(os.path.join(raw, "console.log")).read().split("kernel ", 1)[1].split(",")[0]
except (OSError, IndexError):
    pass
rows = ["# VDUSE block benchmark", "",
        f"Guest: Debian {kver} under QEMU TCG; fio 4 KiB, libaio, O_DIRECT, {secs} s x {reps} reps "
        "(median of the reps). Latency: completion latency percentiles.", "",
        "| target | workload | IOPS | p50 µs | p99 µs | vs qsd (IOPS) |",
        "|---|---|---:|---:|---:|---:|"]
for t in targets:
    failed = os.path.join(raw, f"{t}.failed")
    why = open(failed).read().strip() if os.path.exists(failed) else ""
    for rw, qd in wls:
        r = res[(t, rw, qd)]
        wl = f"{rw} QD{qd}"
        if r is None:
            rows.append(f"| {t} | {wl} | FAILED{': ' + why if why else ''} | | | |")
            continue
        ratio = ""
        if t in peer and res.get((peer[t], rw, qd)):
            ratio = f"{r[0] / res[(peer[t], rw, qd)][0]:.2f}"
        rows.append(f"| {t} | {wl} | {r[0]:.0f} | {r[1]:.1f} | {r[2]:.1f} | {ratio} |")
open(report, "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
echo "vduse-bench: wrote $report" >&2
