#!/usr/bin/env bash
# Network benchmark: uvdpa vs DPDK's vhost-user backend (testpmd net_vhost), same run,
# same client.
#
# The client is DPDK testpmd with a net_virtio_user vdev (a virtio-net driver in user
# space that busy-polls its rings), pinned to one CPU; the backend (server) is pinned to
# the other. Every thread of both sides stays on its CPU (taskset; testpmd's main and
# forwarding lcores share it: --lcores 0@CPU,1@CPU). One queue pair, rows:
#
#   direction  client (testpmd)           DPDK backend      uvdpa backend   measured
#   guest-tx   txonly                     rxonly            sink            client TX pps
#   guest-rx   rxonly                     txonly            source          client RX pps
#   roundtrip  io, start tx_first BURSTS  io (loopback)     loopback        client RX pps
#
# for each frame size (FRAMES) and ring layout (RINGS: split, packed). The client-side
# rate is the comparable number: frames the client got into its TX ring are frames the
# backend consumed (in steady state, give or take one ring), and frames it took from its
# RX ring are frames the backend delivered. The DPDK backend's own counters are shown too.
# Rates are testpmd's own (`show port stats`: packets between two shows / time between
# them), over MEASURE seconds after WARMUP seconds of unmeasured traffic.
#
# Targets: dpdk, uvdpa (skipped with a message when the daemon is not built or refuses
# the net device config). Output: a Markdown report on stdout, also written to
# benches/results/net-<date>.md. Progress goes to stderr.
#
# Environment knobs (defaults in brackets):
#   NET_BENCH_SECS [10]    measured seconds per run
#   NET_BENCH_REPS [3]     repetitions per row (the median is reported)
#   NET_BENCH_WARMUP [2]   unmeasured seconds of traffic before each measurement
#   FRAMES ["64 1518"]     Ethernet frame sizes as in RFC 2544, i.e. counting the 4-byte
#                          FCS that virtio does not carry: the frames in the rings (testpmd
#                          --txpkts, uvdpa frame_len) are FRAME - 4 bytes (60 and 1514)
#   RINGS ["split packed"] virtqueue layouts (packed_vq=0/1)
#   DIRS ["guest-tx guest-rx roundtrip"]
#   TARGETS ["dpdk uvdpa"]
#   QUEUE_SIZE [1024]      virtqueue size (virtio_user queue_size=, uvdpa queue_size)
#   MRG_RXBUF [1]          virtio_user mrg_rxbuf=
#   IN_ORDER [0]           virtio_user in_order= (both backends offer VIRTIO_F_IN_ORDER;
#                          0 compares the drivers' default paths)
#   RT_BURSTS [8]          round trip: bursts of 32 frames the client injects first
#   NOISE_PCT [5]          a run during which a testpmd got less than 100-NOISE_PCT % of
#                          its CPU (other processes took the rest) is repeated ...
#   NOISE_RETRIES [2]      ... up to this many times; the last attempt counts
#   UVDPA_POLL_US [1000000] uvdpa's poll_us (busy-poll, like DPDK)
#   SKIP_BUILD [0]         set to 1 to use the daemon already in target/release
#   UVDPA [target/release/uvdpa]  the daemon binary (another path is not built)
#   TESTPMD [dpdk-testpmd]
#   RESULTS_DIR [benches/results]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${NET_BENCH_SECS:-10}
REPS=${NET_BENCH_REPS:-3}
WARMUP=${NET_BENCH_WARMUP:-2}
FRAMES=${FRAMES:-"64 1518"}
RINGS=${RINGS:-"split packed"}
DIRS=${DIRS:-"guest-tx guest-rx roundtrip"}
TARGETS=${TARGETS:-"dpdk uvdpa"}
QUEUE_SIZE=${QUEUE_SIZE:-1024}
MRG_RXBUF=${MRG_RXBUF:-1}
IN_ORDER=${IN_ORDER:-0}
RT_BURSTS=${RT_BURSTS:-8}
NOISE_PCT=${NOISE_PCT:-5}
NOISE_RETRIES=${NOISE_RETRIES:-2}
UVDPA_POLL_US=${UVDPA_POLL_US:-1000000}
SKIP_BUILD=${SKIP_BUILD:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benches/results}
TESTPMD=${TESTPMD:-dpdk-testpmd}

CLIENT_CPU=0
SERVER_CPU=1
SOCKET_TIMEOUT=30 # seconds to wait for a server's socket
PROMPT_TIMEOUT=60 # seconds to wait for testpmd's first prompt (EAL init is slow when busy)
CMD_TIMEOUT=20    # seconds to wait for one testpmd command
STOP_TIMEOUT=5    # seconds to wait for a process to exit after quit / SIGTERM
MBUFS=16384       # testpmd's default mbuf count does not fit in --no-huge memory
# Every testpmd: no hugepages, no PCI, no shared config files, no telemetry socket, its
# own file prefix.
EAL_COMMON=(--no-pci --no-huge --no-shconf --no-telemetry -m 512)

UVDPA_DEFAULT="$ROOT/target/release/uvdpa"
UVDPA=${UVDPA:-$UVDPA_DEFAULT}
CMDLINE="NET_BENCH_SECS=$SECS NET_BENCH_REPS=$REPS NET_BENCH_WARMUP=$WARMUP FRAMES=\"$FRAMES\" RINGS=\"$RINGS\" DIRS=\"$DIRS\" TARGETS=\"$TARGETS\" QUEUE_SIZE=$QUEUE_SIZE MRG_RXBUF=$MRG_RXBUF IN_ORDER=$IN_ORDER RT_BURSTS=$RT_BURSTS NOISE_PCT=$NOISE_PCT NOISE_RETRIES=$NOISE_RETRIES UVDPA_POLL_US=$UVDPA_POLL_US benches/net.sh${*:+ $*}"

log() { printf '[net.sh] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

for v in NOISE_PCT NOISE_RETRIES REPS QUEUE_SIZE RT_BURSTS UVDPA_POLL_US; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
for v in SECS WARMUP; do
    [[ ${!v} =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$v must be a non-negative number, got '${!v}'"
done
((REPS >= 1)) || die "NET_BENCH_REPS must be at least 1"
((RT_BURSTS >= 1)) || die "RT_BURSTS must be at least 1"
for f in $FRAMES; do
    if ! [[ $f =~ ^[0-9]+$ ]] || ((f < 64 || f > 2000)); then
        die "FRAMES entries must be 64..2000, got '$f'"
    fi
done
for r in $RINGS; do case $r in split | packed) ;; *) die "unknown ring '$r'" ;; esac done
for d in $DIRS; do case $d in guest-tx | guest-rx | roundtrip) ;; *) die "unknown direction '$d'" ;; esac done
for t in $TARGETS; do case $t in dpdk | uvdpa) ;; *) die "unknown target '$t'" ;; esac done
[[ $MRG_RXBUF == [01] && $IN_ORDER == [01] ]] || die "MRG_RXBUF and IN_ORDER must be 0 or 1"
(($(nproc) >= 2)) || die "need at least 2 CPUs (client on cpu$CLIENT_CPU, server on cpu$SERVER_CPU)"
for tool in taskset stdbuf timeout getconf awk mkfifo; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done
command -v "$TESTPMD" >/dev/null ||
    die "$TESTPMD not found (scripts/install-deps.sh installs the Debian package dpdk)"
CLK_TCK=$(getconf CLK_TCK)

want() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- build
UVDPA_SKIP="" # reason the uvdpa rows are skipped, empty if they run
cd "$ROOT"
if want uvdpa; then
    if [[ $SKIP_BUILD != 1 && $UVDPA == "$UVDPA_DEFAULT" ]]; then
        log "building uvdpa-daemon (release)"
        cargo build --release -p uvdpa-daemon >&2 || UVDPA_SKIP="uvdpa-daemon failed to build"
    fi
    [[ -z $UVDPA_SKIP && ! -x $UVDPA ]] && UVDPA_SKIP="$UVDPA does not exist"
fi

# ---------------------------------------------------------------- scratch space
WORK=$(mktemp -d /dev/shm/uvdpa-net.XXXXXX)
# Per testpmd name: pid (of `timeout`), stdin fd, log offset, command line.
declare -A TP_PID=() TP_FD=() TP_MARK=() TP_CMD=()
SERVER_PID=""                    # the uvdpa daemon, when one runs
cleanup() {
    local n
    for n in "${!TP_PID[@]}"; do tp_kill "$n"; done
    stop_daemon || true
    rm -rf "$WORK"
    # EAL's runtime directories (empty with --no-shconf, but created)
    rm -rf /var/run/dpdk/uvdpa-net-$$-* "${XDG_RUNTIME_DIR:-/tmp}"/dpdk/uvdpa-net-$$-* 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- process helpers
# cpu_ticks PID: utime + stime of PID (all threads) in clock ticks (fields 14 and 15 of
# /proc/PID/stat; the comm field can hold spaces, so count from the closing parenthesis).
cpu_ticks() {
    local stat rest
    stat=$(<"/proc/$1/stat") || return 1
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    [[ ${f[0]} != [ZX] ]] || return 1
    echo $((f[11] + f[12]))
}

# wait_gone PID SECS: wait up to SECS for PID to exit; 1 if it is still there.
wait_gone() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# A testpmd runs as `timeout CAP taskset -c CPU stdbuf -oL -eL dpdk-testpmd ...` (CAP
# bounds its life if this script is killed without running its trap), interactive,
# reading commands from a FIFO; its output goes to $WORK/NAME.log.

# tp_start NAME CPU VDEV FWD_MODE [APP_ARGS...]: start it and wait for its first prompt.
tp_start() {
    local name=$1 cpu=$2 vdev=$3 mode=$4
    shift 4
    local fifo="$WORK/$name.in" logf="$WORK/$name.log" cap fd
    rm -f "$fifo"
    mkfifo "$fifo"
    : >"$logf" # before the start: the previous run's log still holds a prompt
    cap=$(awk -v w="$WARMUP" -v s="$SECS" 'BEGIN { printf "%d", w + s + 120 }')
    TP_CMD[$name]="taskset -c $cpu $TESTPMD ${EAL_COMMON[*]} --file-prefix uvdpa-net-$$-$name --lcores 0@$cpu,1@$cpu --vdev '$vdev' -- -i --forward-mode=$mode --total-num-mbufs=$MBUFS --rxq=1 --txq=1 --nb-cores=1 $*"
    timeout -k 2 "$cap" taskset -c "$cpu" stdbuf -oL -eL "$TESTPMD" "${EAL_COMMON[@]}" \
        --file-prefix "uvdpa-net-$$-$name" --lcores "0@$cpu,1@$cpu" --vdev "$vdev" \
        -- -i --forward-mode="$mode" --total-num-mbufs=$MBUFS --rxq=1 --txq=1 --nb-cores=1 "$@" \
        <"$fifo" >"$logf" 2>&1 &
    TP_PID[$name]=$!
    exec {fd}<>"$fifo"
    TP_FD[$name]=$fd
    TP_MARK[$name]=0
    if ! tp_wait_prompt "$name" "$PROMPT_TIMEOUT"; then
        log "$name: no prompt within ${PROMPT_TIMEOUT}s"
        tp_dump "$name"
        tp_kill "$name"
        return 1
    fi
    if grep -q "No probed ethernet devices\|failed to initialize" "$logf"; then
        log "$name: its vdev did not probe"
        tp_dump "$name"
        tp_kill "$name"
        return 1
    fi
}

# tp_wait_prompt NAME SECS: wait for the next "testpmd> " after TP_MARK; moves TP_MARK
# past it and leaves the output since the old mark in TP_OUT.
tp_wait_prompt() {
    local name=$1 logf="$WORK/$1.log" deadline=$((SECONDS + $2)) text
    while :; do
        text=$(tail -c +"$((TP_MARK[$name] + 1))" "$logf" 2>/dev/null || true)
        if [[ $text == *"testpmd> "* ]]; then
            TP_OUT=${text%%testpmd> *}
            # byte offset of the end of that prompt
            TP_MARK[$name]=$((TP_MARK[$name] + $(printf '%s' "${TP_OUT}testpmd> " | wc -c)))
            return 0
        fi
        kill -0 "${TP_PID[$name]}" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# tp_cmd NAME COMMAND: run one command; its output is left in TP_OUT.
tp_cmd() {
    local name=$1
    printf '%s\n' "$2" >&"${TP_FD[$name]}"
    if ! tp_wait_prompt "$name" "$CMD_TIMEOUT"; then
        log "$name: no prompt after '$2' within ${CMD_TIMEOUT}s (gone or wedged)"
        tp_dump "$name"
        return 1
    fi
}

tp_dump() { # tp_dump NAME: the last lines of its log
    log "last output of $1:"
    tail -n 25 "$WORK/$1.log" | sed 's/^/    /' >&2
}

# tp_pid NAME: the testpmd process (the child of `timeout`).
tp_pid() { pgrep -P "${TP_PID[$1]}" | head -n1 || true; }

# tp_quit NAME: `quit`, then SIGTERM / SIGKILL if it lingers.
tp_quit() {
    local name=$1
    [[ -n ${TP_PID[$name]:-} ]] || return 0
    { printf 'quit\n' >&"${TP_FD[$name]}"; } 2>/dev/null || true
    wait_gone "${TP_PID[$name]}" "$STOP_TIMEOUT" || log "$name ignored quit for ${STOP_TIMEOUT}s"
    tp_kill "$name"
}

tp_kill() { # tp_kill NAME: SIGTERM (timeout forwards it), then SIGKILL; reap; close fd
    local name=$1 pid=${TP_PID[$1]:-} child
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        child=$(pgrep -P "$pid" || true)
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
            log "$name ($pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            # shellcheck disable=SC2086 # child may be empty
            kill -KILL "$pid" $child 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    local fd=${TP_FD[$name]:-}
    [[ -n $fd ]] && exec {fd}>&-
    unset "TP_PID[$name]" "TP_FD[$name]"
}

# stat_field TEXT KEY: the number after "KEY:" in testpmd statistics text.
stat_field() {
    awk -v k="$2:" '{ for (i = 1; i < NF; i++) if ($i == k) { print $(i + 1); exit } }' <<<"$1"
}

# ---------------------------------------------------------------- the uvdpa daemon
uvdpa_config() { # uvdpa_config BACKEND FRAME FILE
    {
        echo '[[device]]'
        echo 'name = "net0"'
        echo 'mgmtdev = "net"'
        echo "backend = \"$1\""
        echo 'queue_pairs = 1'
        echo "queue_size = $QUEUE_SIZE"
        echo "poll_us = $UVDPA_POLL_US"
        [[ $1 == source ]] && echo "frame_len = $2"
    } >"$3"
}

# start_daemon BACKEND FRAME: start uvdpa pinned to SERVER_CPU; sets SOCK. On failure
# DAEMON_ERR holds the reason.
start_daemon() {
    local rundir="$WORK/uvdpa.run" cfg="$WORK/uvdpa.toml"
    rm -rf "$rundir"
    mkdir -p "$rundir"
    uvdpa_config "$1" "$2" "$cfg"
    SOCK="$rundir/net0.sock"
    DAEMON_CMD="taskset -c $SERVER_CPU $UVDPA daemon --run-dir RUNDIR --config CONF"
    taskset -c "$SERVER_CPU" "$UVDPA" daemon --run-dir "$rundir" --config "$cfg" \
        >"$WORK/uvdpa.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + SOCKET_TIMEOUT))
    while [[ ! -S $SOCK ]]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=""
            DAEMON_ERR="daemon refused the config: $(grep -v '^\s*$' "$WORK/uvdpa.log" | tail -n 1 | cut -c1-200)"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            DAEMON_ERR="daemon did not create $SOCK within ${SOCKET_TIMEOUT}s"
            stop_daemon
            return 1
        fi
        sleep 0.05
    done
}

stop_daemon() { # SIGTERM, then SIGKILL after STOP_TIMEOUT; reap
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID
    SERVER_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        log "uvdpa ($pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Does the daemon serve a net device at all? One probe with the sink backend.
if want uvdpa && [[ -z $UVDPA_SKIP ]]; then
    if start_daemon sink 64; then
        stop_daemon
    else
        UVDPA_SKIP="uvdpa net device not available ($DAEMON_ERR)"
    fi
fi
[[ -n $UVDPA_SKIP ]] && want uvdpa && log "skipping uvdpa: $UVDPA_SKIP"

# ---------------------------------------------------------------- one run
declare -A L_CLIENT=() L_SERVER=() ERR=() BROKEN=() CMDS=()
RAW="$WORK/raw.md"
: >"$RAW"
FAILED=0
NOISY_KEPT=0
MIN_SHARE=100 # lowest CPU share a testpmd got during a kept run, in %

fail() { # fail KEY REASON: remember the first error of a row
    FAILED=1
    [[ -n ${ERR[$1]:-} ]] || ERR[$1]=$2
}

client_vdev() { # client_vdev SOCK RING
    local packed=0
    [[ $2 == packed ]] && packed=1
    echo "net_virtio_user0,path=$1,queues=1,queue_size=$QUEUE_SIZE,packed_vq=$packed,mrg_rxbuf=$MRG_RXBUF,in_order=$IN_ORDER"
}

# run_once TARGET RING FRAME DIR: one measured run with fresh processes. Sets C_MPPS,
# S_MPPS (DPDK backend's own rate, or empty), SHARE_C, SHARE_S (CPU share in %), NOTE.
# Returns 1 on failure (ERR_MSG says why).
run_once() {
    local target=$1 ring=$2 frame=$3 dir=$4 sock smode cmode cstart ckey skey
    local len=$((frame - 4)) # bytes in the ring: the FCS is not there
    local c0 c1 s0 s1 cpid spid="" t0 t1 c_out s_out
    S_MPPS=""
    case $dir in
    guest-tx) smode=rxonly cmode=txonly cstart=start ckey=Tx-pps skey=Rx-pps ;;
    guest-rx) smode=txonly cmode=rxonly cstart=start ckey=Rx-pps skey=Tx-pps ;;
    roundtrip) smode=io cmode=io cstart="start tx_first $RT_BURSTS" ckey=Rx-pps skey=Rx-pps ;;
    esac
    if [[ $target == dpdk ]]; then
        sock="$WORK/vhost.sock"
        rm -f "$sock"
        if ! tp_start server "$SERVER_CPU" "net_vhost0,iface=$sock,queues=1" "$smode" --txpkts="$len"; then
            ERR_MSG="DPDK backend did not start"
            return 1
        fi
        CMDS[dpdk|$dir]="${TP_CMD[server]}"
        [[ -S $sock ]] || {
            ERR_MSG="DPDK backend created no socket"
            tp_kill server
            return 1
        }
        tp_cmd server start || {
            ERR_MSG="DPDK backend: start failed"
            tp_kill server
            return 1
        }
    else
        local backend
        case $dir in guest-tx) backend=sink ;; guest-rx) backend=source ;; roundtrip) backend=loopback ;; esac
        if ! start_daemon "$backend" "$len"; then
            ERR_MSG="uvdpa backend=$backend: $DAEMON_ERR"
            return 1
        fi
        CMDS[uvdpa|$dir]="$DAEMON_CMD (backend = \"$backend\")"
        sock=$SOCK
    fi
    if ! tp_start client "$CLIENT_CPU" "$(client_vdev "$sock" "$ring")" "$cmode" --txpkts="$len"; then
        ERR_MSG="client did not start"
        stop_all
        return 1
    fi
    CMDS[client|$dir]="${TP_CMD[client]}; then \`$cstart\`"
    if ! tp_cmd client "$cstart"; then
        ERR_MSG="client: '$cstart' failed"
        stop_all
        return 1
    fi
    sleep "$WARMUP"
    cpid=$(tp_pid client)
    if [[ $target == dpdk ]]; then spid=$(tp_pid server); else spid=$SERVER_PID; fi
    # First shows: baselines (testpmd's rates are "since the last show").
    tp_cmd client "show port stats all" || {
        ERR_MSG="client stats failed"
        stop_all
        return 1
    }
    [[ $target == dpdk ]] && { tp_cmd server "show port stats all" || true; }
    c0=$(cpu_ticks "$cpid") || c0=0
    [[ -n $spid ]] && { s0=$(cpu_ticks "$spid") || s0=0; }
    t0=$(date +%s%N)
    sleep "$SECS"
    if ! tp_cmd client "show port stats all"; then
        ERR_MSG="client stats failed"
        stop_all
        return 1
    fi
    c_out=$TP_OUT
    t1=$(date +%s%N)
    c1=$(cpu_ticks "$cpid") || c1=$c0
    [[ -n $spid ]] && { s1=$(cpu_ticks "$spid") || s1=$s0; }
    if [[ $target == dpdk ]]; then
        tp_cmd server "show port stats all" && s_out=$TP_OUT || s_out=""
        local v
        v=$(stat_field "$s_out" "$skey")
        [[ -n $v ]] && S_MPPS=$(awk -v v="$v" 'BEGIN { printf "%.3f", v / 1e6 }')
    elif [[ -n $SERVER_PID ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        ERR_MSG="uvdpa daemon died"
        stop_all
        return 1
    fi
    local v
    v=$(stat_field "$c_out" "$ckey")
    if [[ -z $v ]]; then
        ERR_MSG="no $ckey in the client's stats"
        stop_all
        return 1
    fi
    C_MPPS=$(awk -v v="$v" 'BEGIN { printf "%.3f", v / 1e6 }')
    local wall=$(((t1 - t0) / 1000))
    SHARE_C=$(share $((c1 - c0)) "$wall")
    SHARE_S=""
    [[ -n $spid ]] && SHARE_S=$(share $((s1 - s0)) "$wall")
    RUN_DETAIL="client: $(grep -E 'RX-packets|TX-packets|pps' <<<"$c_out" | tr -s ' ' | tr '\n' ';')"
    [[ $target == dpdk ]] && RUN_DETAIL+=" server: $(grep -E 'RX-packets|TX-packets|pps' <<<"$s_out" | tr -s ' ' | tr '\n' ';')"
    stop_all
    return 0
}

share() { # share TICKS WALL_US: CPU time as a percentage of the wall time
    awk -v t="$1" -v w="$2" -v hz="$CLK_TCK" 'BEGIN { v = (w > 0 ? 100 * t / hz / (w / 1e6) : 0); printf "%.0f", v }'
}

stop_all() {
    tp_quit client
    tp_quit server
    stop_daemon
}

# measure TARGET RING FRAME DIR REP: run_once with the noise retries.
measure() {
    local target=$1 ring=$2 frame=$3 dir=$4 rep=$5 key="$1|$2|$3|$4" attempt att note low
    for ((attempt = 1; ; attempt++)); do
        att=""
        ((attempt > 1)) && att=" attempt $attempt"
        log "$target $dir ${frame}B $ring rep $rep/$REPS$att (${WARMUP}s + ${SECS}s)"
        if ! run_once "$target" "$ring" "$frame" "$dir"; then
            log "$target $dir ${frame}B $ring: $ERR_MSG"
            fail "$key" "$ERR_MSG (rep $rep)"
            printf -- '- %s %s %sB %s rep %s%s: FAILED: %s\n' "$target" "$dir" "$frame" "$ring" "$rep" "$att" "$ERR_MSG" >>"$RAW"
            [[ $ERR_MSG == uvdpa* ]] && BROKEN[$target|$dir]=1
            return 0
        fi
        # Only testpmd is known to busy-poll all the time; uvdpa's share is reported.
        low=$SHARE_C
        [[ $target == dpdk && -n $SHARE_S ]] && ((SHARE_S < low)) && low=$SHARE_S
        note=""
        if ((low < 100 - NOISE_PCT)); then
            if ((attempt <= NOISE_RETRIES)); then
                note=" (discarded: other load)"
            else
                note=" (kept after $NOISE_RETRIES retries despite other load)"
                NOISY_KEPT=$((NOISY_KEPT + 1))
            fi
            log "warning: a testpmd got only $low% of its CPU (client ${SHARE_C}%${SHARE_S:+, $target server ${SHARE_S}%})$note"
        fi
        printf -- '- %s %s %sB %s rep %s%s: client %s Mpps%s, cpu share client %s%%%s%s; %s\n' \
            "$target" "$dir" "$frame" "$ring" "$rep" "$att" "$C_MPPS" \
            "${S_MPPS:+, DPDK backend $S_MPPS Mpps}" "$SHARE_C" "${SHARE_S:+ server $SHARE_S%}" \
            "$note" "$RUN_DETAIL" >>"$RAW"
        [[ $note == " (discarded: other load)" ]] && continue
        break
    done
    ((low < MIN_SHARE)) && MIN_SHARE=$low
    L_CLIENT[$key]+=" $C_MPPS"
    [[ -n $S_MPPS ]] && L_SERVER[$key]+=" $S_MPPS"
    return 0
}

# cpu_busy: per-CPU busy percentage over one second, e.g. "cpu0 3% cpu1 100%".
cpu_busy() {
    local a b
    a=$(grep '^cpu[0-9]' /proc/stat)
    sleep 1
    b=$(grep '^cpu[0-9]' /proc/stat)
    awk 'NR == FNR { for (i = 2; i <= NF; i++) t0[$1] += $i; i0[$1] = $5 + $6; next }
         { t = 0; for (i = 2; i <= NF; i++) t += $i; dt = t - t0[$1]; di = $5 + $6 - i0[$1]
           printf "%s%s %.0f%%", sep, $1, (dt > 0 ? 100 * (dt - di) / dt : 0); sep = " " }
         END { print "" }' <(echo "$a") <(echo "$b")
}

IDLE_BEFORE=$(cpu_busy)
log "CPU busy before the run (should be ~0%): $IDLE_BEFORE"

# ---------------------------------------------------------------- the runs
# Targets are interleaved per row (order rotated per rep), fresh processes every run.
read -ra TLIST <<<"$TARGETS"
for ((rep = 1; rep <= REPS; rep++)); do
    for ring in $RINGS; do
        for frame in $FRAMES; do
            for dir in $DIRS; do
                n=${#TLIST[@]}
                for ((i = 0; i < n; i++)); do
                    target=${TLIST[(i + rep - 1) % n]}
                    [[ $target == uvdpa && -n $UVDPA_SKIP ]] && continue
                    [[ -z ${BROKEN[$target|$dir]:-} ]] || continue
                    measure "$target" "$ring" "$frame" "$dir" "$rep"
                done
            done
        done
    done
done

# ---------------------------------------------------------------- report
median() {
    printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {
        if (NR == 0) { print ""; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
fmt() { [[ -z $1 ]] || awk -v v="$1" 'BEGIN { printf "%.2f", v }'; }
cell() { # cell TARGET RING FRAME DIR: median client Mpps, or why there is none
    local key="$1|$2|$3|$4"
    if [[ $1 == uvdpa && -n $UVDPA_SKIP ]]; then
        echo "skipped"
    elif [[ -n ${L_CLIENT[$key]:-} ]]; then
        # shellcheck disable=SC2086 # the list is meant to split
        fmt "$(median ${L_CLIENT[$key]})"
    else
        echo "failed"
    fi
}

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && REV+=" (dirty tree)"
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/net-$STAMP.md"
DPDK_VERSION=$(dpkg-query -W -f '${Version}' dpdk 2>/dev/null || echo unknown)

{
    echo "# uvdpa network benchmark, $STAMP"
    echo
    echo "- command: \`$CMDLINE\`"
    echo "- client: DPDK testpmd (dpdk $DPDK_VERSION) \`net_virtio_user0,path=SOCK,queues=1,queue_size=$QUEUE_SIZE,packed_vq=0|1,mrg_rxbuf=$MRG_RXBUF,in_order=$IN_ORDER\`, all threads on cpu$CLIENT_CPU (\`taskset -c $CLIENT_CPU\`, \`--lcores 0@$CLIENT_CPU,1@$CLIENT_CPU\`), interactive, 1 forwarding lcore"
    echo "- backends: all threads on cpu$SERVER_CPU (\`taskset -c $SERVER_CPU\`): DPDK testpmd \`net_vhost0,iface=SOCK,queues=1\`; uvdpa daemon (${UVDPA_SKIP:-$UVDPA, poll_us = $UVDPA_POLL_US})"
    echo "- EAL: \`${EAL_COMMON[*]} --file-prefix UNIQUE\`, \`--total-num-mbufs=$MBUFS\`; round trip: client \`io\` after \`start tx_first $RT_BURSTS\` ($((RT_BURSTS * 32)) frames in flight), backend loopback"
    echo "- kernel: \`$(uname -r)\`; CPU: $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs"
    echo "- CPU busy in the second before the run (other load skews results): $IDLE_BEFORE"
    echo "- lowest CPU share a testpmd got during a kept run: ${MIN_SHARE}% (runs below $((100 - NOISE_PCT))% are repeated up to $NOISE_RETRIES times)"
    if ((NOISY_KEPT > 0)); then
        echo "- **WARNING: $NOISY_KEPT measured run(s) kept although other processes took more than ${NOISE_PCT}% of a testpmd's CPU (the machine was not quiet)**"
    fi
    echo "- uvdpa: $REV"
    echo "- $REPS reps of ${SECS}s (after ${WARMUP}s unmeasured) per row, targets interleaved per row (order rotated per rep), fresh processes per run; Mpps is the median over reps of testpmd's own rate between two \`show port stats\`."
    echo "- Mpps is measured at the client: guest-tx = frames the client put into its TX ring (= consumed by the backend), guest-rx and roundtrip = frames the client took from its RX ring. \"DPDK backend\" is the DPDK backend's own count (RX for guest-tx and roundtrip, TX for guest-rx)."
    echo "- frame: Ethernet frame size with FCS (RFC 2544); the rings carry frame - 4 bytes (testpmd \`--txpkts\`, uvdpa \`frame_len\`)."
    echo
    echo "| direction | frame | ring | DPDK Mpps | DPDK backend Mpps | uvdpa Mpps | uvdpa/DPDK |"
    echo "|---|---:|---|---:|---:|---:|---:|"
    for dir in $DIRS; do
        for frame in $FRAMES; do
            for ring in $RINGS; do
                d=$(cell dpdk "$ring" "$frame" "$dir")
                want dpdk || d="not run"
                u=$(cell uvdpa "$ring" "$frame" "$dir")
                want uvdpa || u="not run"
                sk="dpdk|$ring|$frame|$dir"
                # shellcheck disable=SC2086 # the list is meant to split
                s=$(fmt "$(median ${L_SERVER[$sk]:-})")
                r="n/a"
                if [[ $d =~ ^[0-9.]+$ && $u =~ ^[0-9.]+$ ]]; then
                    r=$(awk -v a="$u" -v b="$d" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')
                fi
                echo "| $dir | $frame | $ring | $d | ${s:-n/a} | $u | $r |"
            done
        done
    done
    if ((${#ERR[@]} > 0)); then
        echo
        echo "Failures:"
        echo
        for k in "${!ERR[@]}"; do echo "- ${k//|/ }: ${ERR[$k]}"; done | sort
    fi
    echo
    echo "Command lines (per direction, from the last run):"
    echo
    for k in $(printf '%s\n' "${!CMDS[@]}" | sort); do
        echo "- ${k//|/ }: \`${CMDS[$k]}\`"
    done
    if want uvdpa; then
        echo "- uvdpa config: \`[[device]] name=\"net0\" mgmtdev=\"net\" backend=\"sink|source|loopback\" queue_pairs=1 queue_size=$QUEUE_SIZE poll_us=$UVDPA_POLL_US frame_len=FRAME-4 (source only)\`"
    fi
    echo
    echo "Raw runs:"
    echo
    cat "$RAW"
} | tee "$OUT"
log "report written to $OUT"

if ((FAILED)); then
    log "some runs failed (see the table)"
    exit 1
fi
