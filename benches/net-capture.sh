#!/usr/bin/env bash
# What `uvdpa dev capture` costs the data path: the loopback round trip of benches/net.sh
# (testpmd net_virtio_user `io`, `start tx_first BURSTS`, frames circulating through a
# uvdpa `loopback` device) measured in four phases on one daemon and one testpmd:
#
#   off       no capture attached (the workers' cost: one relaxed load per batch)
#   on        `uvdpa dev capture net0 -w OUT` draining the ring and writing pcapng
#   stalled   the same capture with its CLI stopped (SIGSTOP): the ring stays full, so
#             every frame costs the check and a counted drop, and the CLI takes no CPU
#   detached  the CLI killed (SIGKILL): the daemon detached the ring
#
# testpmd is pinned to CPU 0, the daemon (poll_us 1 s, busy-polling like DPDK) to CPU 1;
# the capture CLI runs on CPU CAPTURE_CPU [1] (a 2-CPU machine has no third CPU: it
# shares one with a busy-polling side, and "on" includes that contention). Rates are
# testpmd's Rx-pps over SECS seconds. Output: a Markdown table on stdout.
#
# Knobs: SECS [5], FRAME [60] (bytes in the ring, i.e. 64 with FCS), BURSTS [8],
# RING [split|packed, default split], OUT [/dev/null], CAPTURE_CPU [1], SKIP_BUILD [0],
# UVDPA [target/release/uvdpa], TESTPMD [dpdk-testpmd].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-5}
FRAME=${FRAME:-60}
BURSTS=${BURSTS:-8}
RING=${RING:-split}
OUT=${OUT:-/dev/null}
CAPTURE_CPU=${CAPTURE_CPU:-1}
UVDPA=${UVDPA:-$ROOT/target/release/uvdpa}
TESTPMD=${TESTPMD:-dpdk-testpmd}
log() { printf '[net-capture.sh] %s\n' "$*" >&2; }

if [[ ${SKIP_BUILD:-0} != 1 && $UVDPA == "$ROOT/target/release/uvdpa" ]]; then
    (cd "$ROOT" && cargo build --release --bin uvdpa >&2)
fi
WORK=$(mktemp -d /tmp/uvdpa-capbench.XXXXXX)
DAEMON= TP= CAP=
cleanup() {
    for p in $CAP $TP $DAEMON; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/uvdpa.toml" <<EOF
[[device]]
name = "net0"
mgmtdev = "net"
backend = "loopback"
queue_size = 1024
poll_us = 1000000
EOF
taskset -c 1 "$UVDPA" daemon --run-dir "$WORK" --config "$WORK/uvdpa.toml" \
    >/dev/null 2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [[ -S $WORK/net0.sock ]] && break; sleep 0.1; done
[[ -S $WORK/net0.sock ]] || { log "daemon did not start"; cat "$WORK/daemon.log" >&2; exit 1; }

packed=0
[[ $RING == packed ]] && packed=1
mkfifo "$WORK/tp.in"
timeout -k 2 600 taskset -c 0 stdbuf -oL -eL "$TESTPMD" --no-pci --no-huge --no-shconf \
    --no-telemetry -m 512 --file-prefix "uvdpa-capbench-$$" --lcores 0@0,1@0 \
    --vdev "net_virtio_user0,path=$WORK/net0.sock,queues=1,queue_size=1024,packed_vq=$packed" \
    -- -i --forward-mode=io --total-num-mbufs=16384 --rxq=1 --txq=1 --nb-cores=1 \
    --txpkts="$FRAME" <"$WORK/tp.in" >"$WORK/tp.log" 2>&1 &
TP=$!
exec 3<>"$WORK/tp.in"
prompts() { grep -c 'testpmd> ' "$WORK/tp.log" || true; }
tp() { # tp CMD: send a command, wait for the next prompt
    local n
    n=$(prompts)
    printf '%s\n' "$1" >&3
    for _ in $(seq 200); do (($(prompts) > n)) && return 0; sleep 0.05; done
    log "testpmd: no prompt after '$1'"
    tail -n 20 "$WORK/tp.log" >&2
    exit 1
}
for _ in $(seq 600); do (($(prompts) > 0)) && break; sleep 0.1; done
(($(prompts) > 0)) || { log "testpmd did not start"; tail -n 20 "$WORK/tp.log" >&2; exit 1; }
tp "start tx_first $BURSTS"
sleep 2
rate() { # Rx-pps over SECS (testpmd's own: between two `show port stats`)
    tp "show port stats 0"
    sleep "$SECS"
    tp "show port stats 0"
    grep -o 'Rx-pps: *[0-9]*' "$WORK/tp.log" | tail -n1 | awk '{ printf "%.2f", $2 / 1e6 }'
}
drops() { "$UVDPA" --ctl "$WORK/uvdpa.ctl" -j dev vstats show net0 qidx 0 | grep -o '"drops":[0-9]*' | cut -d: -f2; }

declare -A MPPS
MPPS[off]=$(rate)
taskset -c "$CAPTURE_CPU" "$UVDPA" --ctl "$WORK/uvdpa.ctl" dev capture net0 -w "$OUT" \
    2>"$WORK/capture.log" &
CAP=$!
for _ in $(seq 100); do grep -q 'capturing on' "$WORK/capture.log" && break; sleep 0.05; done
grep -q 'capturing on' "$WORK/capture.log" || { log "capture did not start"; cat "$WORK/capture.log" >&2; exit 1; }
MPPS[on]=$(rate)
kill -STOP "$CAP"
sleep 1
MPPS[stalled]=$(rate)
kill -KILL "$CAP"
wait "$CAP" 2>/dev/null || true
CAP=
sleep 1
MPPS[detached]=$(rate)
left=$("$UVDPA" --ctl "$WORK/uvdpa.ctl" -j res show capture | { grep -o '"type":"capture"' || true; } | wc -l)
tp "stop"
printf '| phase | Mpps (testpmd Rx) | vs off |\n|---|---:|---:|\n'
for p in off on stalled detached; do
    printf '| %s | %s | %s |\n' "$p" "${MPPS[$p]}" \
        "$(awk -v a="${MPPS[$p]}" -v b="${MPPS[off]}" 'BEGIN { printf "%+.1f %%", (a / b - 1) * 100 }')"
done
printf '\nloopback, %s rings, %s-byte frames, %s s per phase, %s bursts; capture to %s, CLI on CPU %s; capture entries left after SIGKILL: %s; device rx drops: %s\n' \
    "$RING" "$FRAME" "$SECS" "$BURSTS" "$OUT" "$CAPTURE_CPU" "$left" "$(drops)"
