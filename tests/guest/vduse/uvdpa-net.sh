# uvdpa's virtio-net over VDUSE in the 6.12 guest (run by run.sh;
# crates/daemon/tests/vduse_guest.rs runs it). One `uvdpa daemon` (UVDPA_LOG=debug, log in
# /out) serves uvn: mgmtdev net, backend loopback (every frame the driver transmits comes
# back to it on the receive queue), a fixed MAC, bound to the vDPA bus; virtio_net makes a
# netdev of it (/sys/bus/vdpa/devices/uvn/virtio*/net/IF).
#
# env: UVDPA_BIN  the uvdpa binary (default: $UVDPA_REPO/target/debug/uvdpa)
#
# Cases ("UVDPA-CASE: NAME PASS|FAIL" each; exits non-zero if any failed):
#   net_netdev    the netdev appears, its MAC and MTU are the configured ones, dev show
#                 says vduse / uvn / IF, `ip link set up` brings it up with carrier
#   net_frames    an address and arping (ARP requests out, reflected back); then 40 raw
#                 frames (AF_PACKET, 60..1514 bytes, random payloads) come back byte for
#                 byte; the netdev's tx/rx counters and uvdpa's vstats (qidx 0 rx,
#                 qidx 1 tx) grew by at least as many frames, no drops or errors
#   shutdown      SIGTERM: the daemon exits 0, the netdev and /dev/vduse/uvn are gone
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"
cd /tmp || exit 1

BIN="${UVDPA_BIN:-$UVDPA_REPO/target/debug/uvdpa}"
RUN=/tmp/uvdpa
CTL="$RUN/uvdpa.ctl"
OUT="${UVDPA_OUT:-/tmp}"
touch "$OUT/.w" 2> /dev/null && rm -f "$OUT/.w" || OUT=/tmp
LOG="$OUT/uvdpa-net-daemon.log"
CFG=/tmp/uvdpa-net.toml
MAC=02:00:00:00:00:42

[ -x "$BIN" ] || die "no uvdpa binary at $BIN"
command -v jq > /dev/null || die "jq not installed"
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)" || die "python3 not installed"
load_vduse_modules net || die "loading the VDUSE net modules"

uv() { deadline 30 "$BIN" --ctl "$CTL" "$@"; }
jcheck() {
    jq -e "$2" "$1" > /dev/null || { cat "$1" >&2; echo >&2; die "$3"; }
}
# vstats QIDX: uvn's counters of a queue, saved as /tmp/vstats-QIDX.json (and in /out)
vstats() {
    uv -j dev vstats show uvn qidx "$1" > "/tmp/vstats-$1.json" || return 1
    cp "/tmp/vstats-$1.json" "$OUT/uvn-vstats-$1-${2:-}.json" 2> /dev/null
    jq -c .vstats "/tmp/vstats-$1.json"
}
netdev_of() {
    for _n in /sys/bus/vdpa/devices/uvn/virtio*/net/*; do
        [ -e "$_n" ] && { echo "${_n##*/}"; return 0; }
    done
    return 1
}
stat_of() { cat "/sys/class/net/$1/statistics/$2"; }

cat > "$CFG" << EOF
[[device]]
name = "uvn"
mgmtdev = "net"
backend = "loopback"
mac = "$MAC"
transport = "vduse"
EOF
cp "$CFG" "$OUT/" 2> /dev/null
mkdir -p "$RUN"
UVDPA_LOG=debug "$BIN" daemon --run-dir "$RUN" --config "$CFG" > "$OUT/uvdpa-net-daemon.out" 2> "$LOG" &
DPID=$!
wait_path "$CTL" 30 "$DPID" || { tail -n 50 "$LOG" >&2; die "the daemon made no control socket"; }
say "daemon $DPID up"

case_net_netdev() {
    end=$(($(date +%s) + 30))
    until IF="$(netdev_of)"; do
        [ "$(date +%s)" -lt "$end" ] || {
            ls -lR /sys/bus/vdpa/devices/ >&2
            die "no netdev under /sys/bus/vdpa/devices/uvn/virtio*/net within 30 s"
        }
        kill -0 "$DPID" 2> /dev/null || die "the daemon exited"
        sleep 0.2
    done
    echo "$IF" > /tmp/ifname
    say "uvn is netdev $IF"
    [ "$(cat /sys/class/net/"$IF"/address)" = "$MAC" ] ||
        die "$IF has MAC $(cat /sys/class/net/"$IF"/address), not the configured $MAC"
    [ "$(cat /sys/class/net/"$IF"/mtu)" = 1500 ] || die "$IF has MTU $(cat /sys/class/net/"$IF"/mtu), not 1500"
    uv -j dev show uvn > /tmp/show-uvn.json || die "dev show uvn"
    cp /tmp/show-uvn.json "$OUT/" 2> /dev/null
    cat /tmp/show-uvn.json
    jcheck /tmp/show-uvn.json ".dev[0] | .transport == \"vduse\" and .vdpa == \"uvn\" and .kernel_dev == \"$IF\" and .mac == \"$MAC\"" \
        "dev show uvn: not transport vduse, vdpa uvn, kernel_dev $IF, mac $MAC"
    jcheck /tmp/show-uvn.json '.dev[0].status | index("DRIVER_OK") != null' "dev show uvn: no DRIVER_OK"
    deadline 20 ip link set "$IF" up || die "ip link set $IF up"
    end=$(($(date +%s) + 10))
    until [ "$(cat /sys/class/net/"$IF"/carrier 2> /dev/null)" = 1 ]; do
        [ "$(date +%s)" -lt "$end" ] || die "$IF has no carrier 10 s after link up ($(cat /sys/class/net/"$IF"/operstate))"
        sleep 0.2
    done
    say "$IF is up: $(ip -br link show dev "$IF")"
}

case_net_frames() {
    IF="$(cat /tmp/ifname 2> /dev/null)" || die "no netdev (net_netdev failed)"
    [ -n "$IF" ] || die "no netdev (net_netdev failed)"
    deadline 20 ip addr add 10.99.0.1/24 dev "$IF" || die "ip addr add on $IF"
    tx0="$(stat_of "$IF" tx_packets)" rx0="$(stat_of "$IF" rx_packets)"
    vstats 0 before > /tmp/vs0-before || die "vstats uvn qidx 0"
    vstats 1 before > /tmp/vs1-before || die "vstats uvn qidx 1"
    # ARP requests for a neighbour nobody answers: out on tx, reflected back on rx
    deadline 20 /bin/busybox arping -c 3 -w 6 -I "$IF" 10.99.0.2 > /tmp/arping.out 2>&1
    tx1="$(stat_of "$IF" tx_packets)" rx1="$(stat_of "$IF" rx_packets)"
    say "$IF after arping: tx_packets $tx0 -> $tx1, rx_packets $rx0 -> $rx1"
    [ $((tx1 - tx0)) -ge 3 ] || die "$IF sent $((tx1 - tx0)) frames for 3 ARP requests"
    [ $((rx1 - rx0)) -ge 3 ] || die "$IF received $((rx1 - rx0)) frames: the loopback reflected fewer than the 3 ARP requests"

    # raw frames to our own MAC, ethertype 0x88b5, must come back byte for byte
    cat > /tmp/frames.py << 'EOF'
import os, socket, sys, time
ifname, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
ETH = 0x88B5
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH))
s.bind((ifname, ETH))
s.settimeout(1.0)
sent = []
for n in (60, 61, 128, 255, 1000, 1499, 1514) * 5 + (60, 1514) * 2 + (777,):
    seq = len(sent).to_bytes(2, "big")
    f = mac + mac + ETH.to_bytes(2, "big") + seq + os.urandom(n - 16)
    s.send(f)
    sent.append(f)
got = []
end = time.time() + 15
while len(got) < len(sent) and time.time() < end:
    try:
        data, addr = s.recvfrom(65536)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    got.append(data)
print(f"sent {len(sent)} frames, received {len(got)} back")
if len(got) != len(sent):
    sys.exit(f"only {len(got)} of {len(sent)} frames came back")
if sorted(got) != sorted(sent):
    bad = [i for i, f in enumerate(sent) if f not in got]
    sys.exit(f"{len(bad)} frames came back changed, e.g. frame {bad[0]} ({len(sent[bad[0]])} bytes)")
print("every frame came back unchanged" + ("" if got == sent else " (reordered)"))
EOF
    deadline 60 "$PY" /tmp/frames.py "$IF" "$MAC" || die "raw frames over the loopback"
    tx2="$(stat_of "$IF" tx_packets)" rx2="$(stat_of "$IF" rx_packets)"
    say "$IF after the raw frames: tx_packets $tx1 -> $tx2, rx_packets $rx1 -> $rx2"
    [ $((tx2 - tx1)) -ge 40 ] || die "$IF counted $((tx2 - tx1)) transmitted frames for 40 sent"
    [ $((rx2 - rx1)) -ge 40 ] || die "$IF counted $((rx2 - rx1)) received frames for 40 reflected"
    for s in rx_dropped tx_dropped rx_errors tx_errors; do
        [ "$(stat_of "$IF" $s)" = 0 ] || die "$IF $s is $(stat_of "$IF" $s)"
    done
    v0="$(vstats 0 after)" || die "vstats uvn qidx 0"
    v1="$(vstats 1 after)" || die "vstats uvn qidx 1"
    say "uvn qidx 0: $v0"
    say "uvn qidx 1: $v1"
    jcheck /tmp/vstats-0.json '.vstats.queue_type == "rx"' "uvn qidx 0 is not the rx queue"
    jcheck /tmp/vstats-1.json '.vstats.queue_type == "tx"' "uvn qidx 1 is not the tx queue"
    jq -e --slurpfile b /tmp/vs0-before '.vstats | .packets - $b[0].packets >= 43 and .bytes > $b[0].bytes and .errors == 0 and .drops == 0' \
        /tmp/vstats-0.json > /dev/null || die "uvn rx counters did not grow by the 43 reflected frames (or drops/errors)"
    jq -e --slurpfile b /tmp/vs1-before '.vstats | .packets - $b[0].packets >= 43 and .bytes > $b[0].bytes and .errors == 0 and .drops == 0' \
        /tmp/vstats-1.json > /dev/null || die "uvn tx counters did not grow by the 43 sent frames (or drops/errors)"
    say "uvn: $((tx2 - tx0)) frames out, $((rx2 - rx0)) back; vstats agree"
}

FAILED=""
for c in net_netdev net_frames; do
    say "=== case $c"
    t0=$(date +%s)
    if (case_"$c"); then
        echo "UVDPA-CASE: $c PASS ($(($(date +%s) - t0)) s)"
    else
        echo "UVDPA-CASE: $c FAIL ($(($(date +%s) - t0)) s)"
        FAILED="$FAILED $c"
        say "daemon log tail:"; tail -n 40 "$LOG" >&2
    fi
done

say "=== case shutdown"
IF="$(cat /tmp/ifname 2> /dev/null)"
kill -TERM "$DPID"
end=$(($(date +%s) + 45))
while kill -0 "$DPID" 2> /dev/null && [ "$(awk '{ print $3 }' /proc/"$DPID"/stat 2> /dev/null)" != Z ]; do
    [ "$(date +%s)" -lt "$end" ] || break
    sleep 0.2
done
if kill -0 "$DPID" 2> /dev/null && [ "$(awk '{ print $3 }' /proc/"$DPID"/stat 2> /dev/null)" != Z ]; then
    say "the daemon did not exit within 45 s of SIGTERM"; rc=timeout
    kill -9 "$DPID" 2> /dev/null
else
    wait "$DPID"; rc=$?
fi
left=""
[ -z "$IF" ] || [ ! -e /sys/class/net/"$IF" ] || left="$left /sys/class/net/$IF"
[ ! -e /dev/vduse/uvn ] || left="$left /dev/vduse/uvn"
[ ! -e /sys/bus/vdpa/devices/uvn ] || left="$left /sys/bus/vdpa/devices/uvn"
if [ "$rc" = 0 ] && [ -z "$left" ]; then
    echo "UVDPA-CASE: shutdown PASS"
else
    echo "UVDPA-CASE: shutdown FAIL (exit $rc; left:${left:- nothing})"
    FAILED="$FAILED shutdown"
    tail -n 40 "$LOG" >&2
fi

[ -z "$FAILED" ] || die "failed cases:$FAILED"
say "all cases passed: net_netdev net_frames shutdown"
