#!/usr/bin/env bash
# Block benchmark: uvdpa vs qemu-storage-daemon (qsd), same run, same client.
#
# For every target the server is started pinned to one CPU, the libblkio client
# (uvdpa-blkbench) runs pinned to another, and 4 KiB random reads on one queue are
# measured at each queue depth, REPS times. Server CPU time (utime+stime from
# /proc/PID/stat) is sampled around every client run and reported per I/O.
#
# Targets: qsd-null, qsd-ram, uvdpa-null, uvdpa-ram (4 KiB random reads at each of QDS),
# and qsd-file, uvdpa-file: a raw image on the real disk (FILE_DIR, not tmpfs) opened
# with O_DIRECT (qsd: cache.direct=on,aio=QSD_FILE_AIO; uvdpa: direct = true, aio
# io_uring), measured with each of FILE_WORKLOADS. uvdpa targets are skipped with a
# message when the daemon is not built. Output: a Markdown report on stdout, also
# written to benches/results/blk-<date>.md. Progress goes to stderr.
#
# Environment knobs (defaults in brackets):
#   RUNTIME [10]   measured seconds per client run
#   REPS [3]       repetitions per target and queue depth
#   RAMP [1]       unmeasured warm-up seconds at the start of each client run
#   QDS ["1 32"]   queue depths
#   TARGETS ["qsd-null qsd-ram uvdpa-null uvdpa-ram qsd-file uvdpa-file"]
#   FILE_WORKLOADS ["randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32
#                   read:1M:8 write:1M:8"]  RW:BS:QD for the file targets (RW: randread,
#                  randwrite, read, write = sequential; BS with an optional k/M suffix)
#   FILE_DIR [/var/tmp]  where the file targets' image lives (must be a real disk)
#   FILE_SIZE_MB [1024]  its size; written with real data (O_DIRECT) before the runs
#   QSD_FILE_AIO [io_uring]  aio mode of qsd-file
#   QSD_AIO [auto] aio mode for qsd-ram: auto (probe threads and io_uring, keep the
#                  faster), threads or io_uring
#   AIO_PROBE_SECS [3]  length of each QD32 probe run when QSD_AIO=auto
#   NOISE_PCT [5]  a run during which other processes kept the client or server CPU
#                  busier than this (percent) is repeated ...
#   NOISE_RETRIES [2]  ... up to this many times; the last attempt counts
#   WARMUP [10]    seconds of unmeasured QD32 load before the first measured run (an
#                  idle VM runs the first seconds of load measurably slower)
#   SKIP_BUILD [0] set to 1 to use the binaries already in target/release
#   UVDPA [target/release/uvdpa]  the daemon binary (another path is not built)
#   RESULTS_DIR [benches/results]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}
RAMP=${RAMP:-1}
QDS=${QDS:-"1 32"}
TARGETS=${TARGETS:-"qsd-null qsd-ram uvdpa-null uvdpa-ram qsd-file uvdpa-file"}
FILE_WORKLOADS=${FILE_WORKLOADS:-"randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:1M:8 write:1M:8"}
FILE_DIR=${FILE_DIR:-/var/tmp}
FILE_SIZE_MB=${FILE_SIZE_MB:-1024}
QSD_FILE_AIO=${QSD_FILE_AIO:-io_uring}
QSD_AIO=${QSD_AIO:-auto}
AIO_PROBE_SECS=${AIO_PROBE_SECS:-3}
WARMUP=${WARMUP:-10}
NOISE_PCT=${NOISE_PCT:-5}
NOISE_RETRIES=${NOISE_RETRIES:-2}
SKIP_BUILD=${SKIP_BUILD:-0}
# uvdpa's busy-poll window (µs) after a ring empties; qsd polls by default (poll-max-ns
# 32768, adaptive), so the comparison gives uvdpa the same 32 µs. 0 turns it off.
UVDPA_POLL_US=${UVDPA_POLL_US:-32}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benches/results}

QSD=${QSD:-qemu-storage-daemon}
CLIENT_CPU=0
SERVER_CPU=1
SIZE_BYTES=$((1024 * 1024 * 1024)) # 1 GiB; qsd 7.2's null-co wants a plain integer
BS=4096
RW=randread
SOCKET_TIMEOUT=10 # seconds to wait for a server's socket
STOP_TIMEOUT=5    # seconds to wait for a server to exit after SIGTERM

BENCH="$ROOT/target/release/uvdpa-blkbench"
UVDPA_DEFAULT="$ROOT/target/release/uvdpa"
UVDPA=${UVDPA:-$UVDPA_DEFAULT}
CMDLINE="RUNTIME=$RUNTIME REPS=$REPS RAMP=$RAMP WARMUP=$WARMUP NOISE_PCT=$NOISE_PCT NOISE_RETRIES=$NOISE_RETRIES QDS=\"$QDS\" TARGETS=\"$TARGETS\" QSD_AIO=$QSD_AIO UVDPA_POLL_US=$UVDPA_POLL_US FILE_WORKLOADS=\"$FILE_WORKLOADS\" FILE_DIR=$FILE_DIR FILE_SIZE_MB=$FILE_SIZE_MB QSD_FILE_AIO=$QSD_FILE_AIO benches/blk.sh${*:+ $*}"

log() { printf '[blk.sh] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

for v in NOISE_PCT NOISE_RETRIES; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
for v in FILE_SIZE_MB; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for v in RUNTIME REPS RAMP AIO_PROBE_SECS WARMUP; do
    [[ ${!v} =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$v must be a non-negative number, got '${!v}'"
done
((REPS >= 1)) || die "REPS must be at least 1"
for qd in $QDS; do [[ $qd =~ ^[1-9][0-9]*$ ]] || die "QDS entries must be positive integers, got '$qd'"; done
for t in $TARGETS; do
    case $t in qsd-null | qsd-ram | qsd-file | uvdpa-null | uvdpa-ram | uvdpa-file) ;; *) die "unknown target '$t'" ;; esac
done
for wl in $FILE_WORKLOADS; do
    [[ $wl =~ ^(randread|randwrite|read|write):[0-9]+[kM]?:[1-9][0-9]*$ ]] ||
        die "FILE_WORKLOADS entries are RW:BS:QD (e.g. randread:4k:32), got '$wl'"
done
case $QSD_FILE_AIO in threads | io_uring | native) ;; *) die "QSD_FILE_AIO must be threads, io_uring or native" ;; esac
case $QSD_AIO in auto | threads | io_uring) ;; *) die "QSD_AIO must be auto, threads or io_uring" ;; esac
(($(nproc) >= 2)) || die "need at least 2 CPUs (client on cpu$CLIENT_CPU, server on cpu$SERVER_CPU)"
for tool in taskset getconf awk; do command -v "$tool" >/dev/null || die "'$tool' not found"; done
CLK_TCK=$(getconf CLK_TCK)

want() { [[ " $TARGETS " == *" $1 "* ]]; }
want_uvdpa() { want uvdpa-null || want uvdpa-ram || want uvdpa-file; }
want_qsd() { want qsd-null || want qsd-ram || want qsd-file; }
want_file() { want uvdpa-file || want qsd-file; }

# The workloads of a target, as RW:BS:QD keys (BS in bytes).
workloads() {
    local wl rw bs qd
    if [[ $1 == *-file ]]; then
        for wl in $FILE_WORKLOADS; do
            IFS=: read -r rw bs qd <<<"$wl"
            case $bs in *k) bs=$((${bs%k} * 1024)) ;; *M) bs=$((${bs%M} * 1048576)) ;; esac
            echo "$rw:$bs:$qd"
        done
    else
        for qd in $QDS; do echo "$RW:$BS:$qd"; done
    fi
}
# human BYTES: 4096 -> 4k, 1048576 -> 1M
human() {
    if (($1 % 1048576 == 0)); then echo "$(($1 / 1048576))M"; elif (($1 % 1024 == 0)); then echo "$(($1 / 1024))k"; else echo "$1"; fi
}

if want_qsd; then
    command -v "$QSD" >/dev/null ||
        die "$QSD not found (apt-get install -y --no-install-recommends qemu-system-common qemu-utils)"
fi

# ---------------------------------------------------------------- build
UVDPA_SKIP="" # reason the uvdpa targets are skipped, empty if they run
cd "$ROOT"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building uvdpa-blkbench (release)"
    cargo build --release -p uvdpa-blkbench >&2 || die "building uvdpa-blkbench failed"
    if want_uvdpa && [[ $UVDPA == "$UVDPA_DEFAULT" ]]; then
        meta=$(cargo metadata --format-version 1 --no-deps 2>/dev/null || true)
        if [[ $meta == *'"name":"uvdpa-daemon"'* ]]; then
            log "building uvdpa-daemon (release)"
            if ! cargo build --release -p uvdpa-daemon >&2; then
                UVDPA_SKIP="uvdpa-daemon failed to build"
            fi
        fi
    fi
fi
[[ -x $BENCH ]] || die "$BENCH missing (build it with: cargo build --release -p uvdpa-blkbench)"
if want_uvdpa && [[ -z $UVDPA_SKIP && ! -x $UVDPA ]]; then
    UVDPA_SKIP="$UVDPA does not exist yet"
fi
[[ -n $UVDPA_SKIP ]] && want_uvdpa && log "skipping uvdpa targets: $UVDPA_SKIP"

# ---------------------------------------------------------------- scratch space
WORK=$(mktemp -d /dev/shm/uvdpa-blk.XXXXXX)
SERVER_PID=""
cleanup() {
    stop_server || true
    rm -rf "$WORK"
    rm -f "$FIMG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
IMG="$WORK/ram.img"
FIMG="$FILE_DIR/uvdpa-blk-bench.$$.img"

# ---------------------------------------------------------------- helpers
# Server CPU time in clock ticks (utime + stime, fields 14 and 15 of /proc/PID/stat;
# the comm field can hold spaces, so count from the closing parenthesis).
cpu_ticks() {
    local stat rest
    stat=$(<"/proc/$1/stat") || return 1
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    [[ ${f[0]} != [ZX] ]] || return 1 # a dead server (zombie) counts as gone
    echo $((f[11] + f[12]))
}

# start_server NAME SOCKET CMD...: start CMD pinned to SERVER_CPU and wait for SOCKET.
start_server() {
    local name=$1 sock=$2
    shift 2
    rm -f "$sock"
    log "starting $name: taskset -c $SERVER_CPU $*"
    taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + SOCKET_TIMEOUT))
    while [[ ! -S $sock ]]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=""
            log "$name exited before creating $sock; its output:"
            sed 's/^/    /' "$WORK/$name.log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name did not create $sock within ${SOCKET_TIMEOUT}s; its output:"
            sed 's/^/    /' "$WORK/$name.log" >&2
            stop_server
            return 1
        fi
        sleep 0.05
    done
}

# Stop the running server (SIGTERM, then SIGKILL after STOP_TIMEOUT) and reap it.
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID
    SERVER_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        log "server $pid ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# jget JSON KEY: a numeric field of the client's flat JSON line.
jget() {
    local re="\"$2\":(-?[0-9.eE+-]+)"
    [[ $1 =~ $re ]] || return 1
    echo "${BASH_REMATCH[1]}"
}

# median of the arguments (mean of the middle two for an even count).
median() {
    printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# client SOCKET ARGS...: run the client pinned to CLIENT_CPU; JSON on stdout.
client() {
    local sock=$1
    shift
    taskset -c "$CLIENT_CPU" "$BENCH" --path "$sock" "$@" 2>"$WORK/client.err"
}

client_error() { sed 's/^/    /' "$WORK/client.err" >&2; }

server_log() { # server_log NAME: the last lines the server printed
    log "last output of $1:"
    tail -n 20 "$WORK/$1.log" | sed 's/^/    /' >&2
}

# The server command lines are built into the array CMD.
qsd_ram_cmd() { # qsd_ram_cmd AIO SOCKET
    CMD=("$QSD" --blockdev "driver=file,node-name=f0,filename=$IMG,cache.direct=off,aio=$1"
        --blockdev "driver=raw,node-name=r0,file=f0"
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$2,writable=on,num-queues=1")
}

qsd_file_cmd() { # qsd_file_cmd SOCKET
    CMD=("$QSD" --blockdev "driver=file,node-name=f0,filename=$FIMG,cache.direct=on,aio=$QSD_FILE_AIO"
        --blockdev "driver=raw,node-name=r0,file=f0"
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$1,writable=on,num-queues=1")
}

qsd_null_cmd() { # qsd_null_cmd SOCKET
    CMD=("$QSD" --blockdev "driver=null-co,node-name=null0,size=$SIZE_BYTES,read-zeroes=on"
        --export "type=vhost-user-blk,id=e0,node-name=null0,addr.type=unix,addr.path=$1,writable=on,num-queues=1")
}

uvdpa_config() { # uvdpa_config BACKEND FILE
    local where='size = "1G"'
    [[ $1 == file ]] && where="path = \"$FIMG\"
direct = true"
    cat >"$2" <<EOF
[[device]]
name = "bench0"
mgmtdev = "blk"
backend = "$1"
$where
queues = 1
queue_size = 256
poll_us = $UVDPA_POLL_US
EOF
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

# busy_ticks: busy clock ticks (everything but idle and iowait, steal included) of the
# client and server CPUs since boot, as "CLIENT SERVER".
busy_ticks() {
    awk -v c="cpu$CLIENT_CPU" -v s="cpu$SERVER_CPU" '
        $1 == c || $1 == s { b = 0; for (i = 2; i <= NF; i++) b += $i; b -= $5 + $6; v[$1] = b }
        END { print v[c], v[s] }' /proc/stat
}

# ---------------------------------------------------------------- results
# Per "target|RW:BS:QD": space-separated per-rep values, and the first error seen.
declare -A L_IOPS L_P50 L_P99 L_CPU ERR
declare -A SERVER_CMD BROKEN
RAW="$WORK/raw.md"
: >"$RAW"
FAILED=0
AIO_NOTE=""
FILE_NOTE=""
MAX_OTHER0=0 # worst load from other processes seen on the client / server CPU, in %
MAX_OTHER1=0
WARMED=0
NOISY_KEPT=0 # measured runs kept although other load exceeded NOISE_PCT

fail() { # fail TARGET WORKLOAD|all REASON: remember the first error of a row
    local target=$1 qd=$2 reason=$3 q
    FAILED=1
    [[ $qd == all ]] && qd=$(workloads "$target")
    for q in $qd; do [[ -n ${ERR[$target|$q]:-} ]] || ERR[$target|$q]=$reason; done
}

# run_once TARGET SOCKET RW:BS:QD: one client run with server CPU and foreign-load accounting.
# Sets OUT (client JSON), SRV_TICKS, OTHER0, OTHER1 (percent load from other processes on
# the client / server CPU). Returns 1 if the client failed, 2 if the server is gone.
run_once() {
    local target=$1 sock=$2 rw bs qd before after t0 t1 busy0 busy1 b0 b1 wall client_ticks
    IFS=: read -r rw bs qd <<<"$3"
    before=$(cpu_ticks "$SERVER_PID" 2>/dev/null) || return 2
    read -r busy0 busy1 < <(busy_ticks)
    t0=$(date +%s%N)
    OUT=$(client "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime "$RUNTIME" --ramp "$RAMP") ||
        return 1
    after=$(cpu_ticks "$SERVER_PID" 2>/dev/null) || after=$before
    t1=$(date +%s%N)
    read -r b0 b1 < <(busy_ticks)
    SRV_TICKS=$((after - before))
    # Load from anything else: CPU busy time minus what the client / server used.
    wall=$(((t1 - t0) * CLK_TCK / 1000000000))
    client_ticks=$(awk -v s="$(jget "$OUT" client_cpu_secs || echo 0)" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.0f", s * hz }')
    OTHER0=$(awk -v b=$((b0 - busy0 - client_ticks)) -v w="$wall" \
        'BEGIN { v = w > 0 ? 100 * b / w : 0; printf "%.0f", v < 0 ? 0 : v }')
    OTHER1=$(awk -v b=$((b1 - busy1 - SRV_TICKS)) -v w="$wall" \
        'BEGIN { v = w > 0 ? 100 * b / w : 0; printf "%.0f", v < 0 ? 0 : v }')
}

# measure TARGET SOCKET REP: one run per queue depth against the running server; a run
# during which other processes loaded either CPU by more than NOISE_PCT is repeated up
# to NOISE_RETRIES times (the last attempt counts).
measure() {
    local target=$1 sock=$2 rep=$3 qd attempt att rc ios cpu_us note
    for qd in $(workloads "$target"); do
        for ((attempt = 1; ; attempt++)); do
            att=""
            ((attempt > 1)) && att=" attempt $attempt"
            log "$target $qd rep $rep/$REPS$att (${RUNTIME}s + ${RAMP}s ramp)"
            rc=0
            run_once "$target" "$sock" "$qd" || rc=$?
            if ((rc == 2)); then
                log "$target: server is gone"
                server_log "$target"
                fail "$target" all "server died (rep $rep)"
                BROKEN[$target]=1
                return 1
            fi
            if ((rc == 1)); then
                log "$target $qd rep $rep: client failed:"
                client_error
                server_log "$target"
                fail "$target" "$qd" "client failed (rep $rep): $(head -c 200 "$WORK/client.err" | tr '\n|' ' /' | sed 's/ *$//')"
                continue 2
            fi
            ios=$(jget "$OUT" total_ios)
            cpu_us=$(awk -v t="$SRV_TICKS" -v hz="$CLK_TCK" -v n="$ios" \
                'BEGIN { printf "%.3f", t * 1e6 / hz / n }')
            note=""
            if ((OTHER0 > NOISE_PCT || OTHER1 > NOISE_PCT)); then
                if ((attempt <= NOISE_RETRIES)); then
                    note=" (discarded: other load)"
                else
                    note=" (kept after $NOISE_RETRIES retries despite other load)"
                    NOISY_KEPT=$((NOISY_KEPT + 1))
                fi
                log "warning: other load during this run: cpu$CLIENT_CPU ${OTHER0}%, cpu$SERVER_CPU ${OTHER1}%$note"
            fi
            ((OTHER0 > MAX_OTHER0)) && MAX_OTHER0=$OTHER0
            ((OTHER1 > MAX_OTHER1)) && MAX_OTHER1=$OTHER1
            # shellcheck disable=SC2016 # the backticks are Markdown
            printf -- '- %s %s rep %s%s: server_cpu_ticks=%s server_cpu_us_per_io=%s other_load=cpu%s:%s%%,cpu%s:%s%%%s `%s`\n' \
                "$target" "$qd" "$rep" "$att" "$SRV_TICKS" "$cpu_us" \
                "$CLIENT_CPU" "$OTHER0" "$SERVER_CPU" "$OTHER1" "$note" "$OUT" >>"$RAW"
            [[ $note == " (discarded: other load)" ]] && continue
            break
        done
        L_IOPS[$target|$qd]+=" $(jget "$OUT" iops)"
        L_P50[$target|$qd]+=" $(jget "$OUT" p50_us)"
        L_P99[$target|$qd]+=" $(jget "$OUT" p99_us)"
        L_CPU[$target|$qd]+=" $cpu_us"
    done
}

# prefill SOCKET: write every block once so a RAM backend holds populated pages.
prefill() {
    log "prefilling 1 GiB through the device (not measured)"
    if ! client "$1" --rw fill --bs "$BS" --iodepth 32 >/dev/null; then
        log "prefill failed:"
        client_error
        return 1
    fi
}

# bench_target TARGET SOCKET REP CMD...: start the server, (prefill,) measure, stop.
bench_target() {
    local target=$1 sock=$2 rep=$3
    shift 3
    SERVER_CMD[$target]="taskset -c $SERVER_CPU $*"
    if ! start_server "$target" "$sock" "$@"; then
        fail "$target" all "server did not start (rep $rep)"
        BROKEN[$target]=1
        return 0
    fi
    if [[ $target == *-ram ]] && ! prefill "$sock"; then
        fail "$target" all "prefill failed (rep $rep)"
        BROKEN[$target]=1
        stop_server
        return 0
    fi
    if ((WARMED == 0)); then
        WARMED=1
        if [[ $WARMUP != 0 && $WARMUP != 0.0 ]]; then
            log "warming up the machine: ${WARMUP}s of unmeasured QD32 load on $target"
            client "$sock" --rw "$RW" --bs "$BS" --iodepth 32 --runtime "$WARMUP" >/dev/null ||
                client_error
        fi
    fi
    measure "$target" "$sock" "$rep" || true
    stop_server
}

IDLE_BEFORE=$(cpu_busy)
log "CPU busy before the run (should be ~0%): $IDLE_BEFORE"

# ---------------------------------------------------------------- warm-up
# A VM that has been idle runs the first seconds of load measurably slower, which
# would penalise whichever run comes first (the aio probe included).
if [[ $WARMUP != 0 && $WARMUP != 0.0 ]] && command -v "$QSD" >/dev/null; then
    sock="$WORK/warmup.sock"
    qsd_null_cmd "$sock"
    if start_server warmup "$sock" "${CMD[@]}"; then
        log "warming up the machine: ${WARMUP}s of unmeasured QD32 load on a qsd null device"
        client "$sock" --rw "$RW" --bs "$BS" --iodepth 32 --runtime "$WARMUP" >/dev/null || client_error
        stop_server
        WARMED=1
    fi
fi

# ---------------------------------------------------------------- qsd aio mode
if want qsd-ram; then
    log "creating 1 GiB RAM image $IMG"
    dd if=/dev/zero of="$IMG" bs=1M count=1024 status=none

    AIO=$QSD_AIO
    if [[ $AIO == auto ]]; then
        declare -A PROBE=()
        for mode in threads io_uring; do
            sock="$WORK/probe-$mode.sock"
            qsd_ram_cmd "$mode" "$sock"
            if ! start_server "qsd-ram-probe-$mode" "$sock" "${CMD[@]}"; then
                log "qsd does not run with aio=$mode; not using it"
                continue
            fi
            if out=$(client "$sock" --rw "$RW" --bs "$BS" --iodepth 32 --runtime "$AIO_PROBE_SECS" --ramp 0); then
                PROBE[$mode]=$(jget "$out" iops)
                log "aio=$mode probe: ${PROBE[$mode]} IOPS at QD32"
            else
                client_error
            fi
            stop_server
        done
        [[ ${#PROBE[@]} -gt 0 ]] || die "qsd-ram probe failed for every aio mode"
        AIO=$(for m in "${!PROBE[@]}"; do echo "${PROBE[$m]} $m"; done | sort -gr | awk 'NR == 1 { print $2 }')
        AIO_NOTE="qsd-ram aio mode: **$AIO** (chosen by a ${AIO_PROBE_SECS}s QD32 randread probe:"
        for m in threads io_uring; do
            if [[ -n ${PROBE[$m]:-} ]]; then
                AIO_NOTE+=" $m $(printf '%.0f' "${PROBE[$m]}") IOPS;"
            else
                AIO_NOTE+=" $m unavailable;"
            fi
        done
        AIO_NOTE="${AIO_NOTE%;})"
    else
        AIO_NOTE="qsd-ram aio mode: **$AIO** (forced by QSD_AIO)"
    fi
fi

# ---------------------------------------------------------------- file image
if want_file; then
    [[ -d $FILE_DIR ]] || die "FILE_DIR $FILE_DIR does not exist"
    fs=$(stat -f -c %T "$FILE_DIR")
    [[ $fs != tmpfs ]] || die "FILE_DIR $FILE_DIR is on tmpfs; the file targets need a real disk"
    log "writing the ${FILE_SIZE_MB} MiB image $FIMG ($fs; O_DIRECT, real blocks: not a sparse file)"
    dd if=/dev/urandom of="$FIMG" bs=1M count="$FILE_SIZE_MB" oflag=direct status=none ||
        die "writing $FIMG failed"
    sync
    FILE_NOTE="file targets: a ${FILE_SIZE_MB} MiB raw image in $FILE_DIR ($fs on $(df --output=source "$FILE_DIR" | tail -n1)), O_DIRECT on both sides, random data written before the runs"
fi

# ---------------------------------------------------------------- the runs
# Targets are interleaved within each repetition, with a fresh server every time, and
# the order rotates from one repetition to the next, so that slow drifts in machine
# load and the position in the sequence hit every target alike.
read -ra TLIST <<<"$TARGETS"
for t in uvdpa-null uvdpa-ram uvdpa-file; do
    want "$t" && [[ -n $UVDPA_SKIP ]] && ERR[$t|skip]="skipped: $UVDPA_SKIP"
done
for ((rep = 1; rep <= REPS; rep++)); do
    n=${#TLIST[@]}
    for ((i = 0; i < n; i++)); do
        target=${TLIST[(i + rep - 1) % n]}
        [[ -z ${BROKEN[$target]:-} && -z ${ERR[$target|skip]:-} ]] || continue
        case $target in
        qsd-null)
            sock="$WORK/qsd-null.sock"
            qsd_null_cmd "$sock"
            ;;
        qsd-ram)
            sock="$WORK/qsd-ram.sock"
            qsd_ram_cmd "$AIO" "$sock"
            ;;
        qsd-file)
            sock="$WORK/qsd-file.sock"
            qsd_file_cmd "$sock"
            ;;
        uvdpa-*)
            backend=${target#uvdpa-}
            rundir="$WORK/$target.run"
            cfg="$WORK/$target.toml"
            rm -rf "$rundir"
            mkdir -p "$rundir"
            uvdpa_config "$backend" "$cfg"
            sock="$rundir/bench0.sock"
            CMD=("$UVDPA" daemon --run-dir "$rundir" --config "$cfg")
            ;;
        esac
        bench_target "$target" "$sock" "$rep" "${CMD[@]}"
    done
done
rm -f "$IMG" "$FIMG"

# ---------------------------------------------------------------- report
declare -A R_IOPS R_P50 R_P99 R_CPU
row_ok() { [[ -z ${ERR[$1|skip]:-} && -z ${ERR[$1|$2]:-} && -n ${L_IOPS[$1|$2]:-} ]]; }
# shellcheck disable=SC2086 # the lists are meant to split
for key in "${!L_IOPS[@]}"; do
    R_IOPS[$key]=$(median ${L_IOPS[$key]})
    R_P50[$key]=$(median ${L_P50[$key]})
    R_P99[$key]=$(median ${L_P99[$key]})
    R_CPU[$key]=$(median ${L_CPU[$key]})
done
fmt0() { awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { printf "%.1f", v }'; }
fmt2() { awk -v v="$1" 'BEGIN { printf "%.2f", v }'; }
mbps() { awk -v i="$1" -v b="$2" 'BEGIN { printf "%.0f", i * b / 1e6 }'; }
ratio() { # ratio KEY_ARRAY NUM_TARGET DEN_TARGET QD
    local -n arr=$1
    local a=${arr[$2|$4]:-} b=${arr[$3|$4]:-}
    if row_ok "$2" "$4" && row_ok "$3" "$4"; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'
    else
        echo "n/a"
    fi
}

QSD_VERSION="n/a"
want_qsd && QSD_VERSION=$("$QSD" --version | head -n1)
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && REV+=" (dirty tree)"
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/blk-$STAMP.md"

{
    echo "# uvdpa block benchmark, $STAMP"
    echo
    echo "- command: \`$CMDLINE\`"
    echo "- client: \`taskset -c $CLIENT_CPU target/release/uvdpa-blkbench --path SOCK --rw RW --bs BS --iodepth QD --runtime $RUNTIME --ramp $RAMP\` (libblkio virtio-blk-vhost-user, 1 queue, completion eventfd); null/ram targets: $RW $BS at QD $QDS"
    echo "- CPU placement: client on cpu$CLIENT_CPU, server on cpu$SERVER_CPU (\`taskset\`)"
    echo "- kernel: \`$(uname -r)\`; CPU: $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs"
    echo "- CPU busy in the second before the run (other load skews results): $IDLE_BEFORE"
    echo "- load from other processes during the runs (CPU busy minus client/server CPU time, worst attempt): cpu$CLIENT_CPU $MAX_OTHER0%, cpu$SERVER_CPU $MAX_OTHER1%; runs above ${NOISE_PCT}% are repeated up to $NOISE_RETRIES times"
    if ((NOISY_KEPT > 0)); then
        echo "- **WARNING: $NOISY_KEPT measured run(s) kept despite other load above ${NOISE_PCT}% (the machine was not quiet); see other_load in the raw runs**"
    fi
    echo "- qsd: $QSD_VERSION"
    echo "- uvdpa: $REV"
    [[ -n $AIO_NOTE ]] && echo "- $AIO_NOTE"
    [[ -n $FILE_NOTE ]] && echo "- $FILE_NOTE"
    echo "- $REPS reps per row, targets interleaved within each rep (order rotated per rep), fresh server per target and rep,"
    echo "  ${WARMUP}s unmeasured warm-up load before the first run;"
    echo "  IOPS, p50 and p99 are the median over reps (each metric separately);"
    echo "  server CPU µs/IO = server utime+stime delta over the whole client run (incl. ramp) / all I/Os of that run, median over reps."
    echo "- RAM targets are prefilled with one sequential write pass through the device before measuring."
    echo
    echo "| target | workload | QD | IOPS | MB/s | p50 µs | p99 µs | server CPU µs/IO |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for t in $TARGETS; do
        for wl in $(workloads "$t"); do
            IFS=: read -r rw bs qd <<<"$wl"
            st=${ERR[$t|skip]:-${ERR[$t|$wl]:-not run}}
            if row_ok "$t" "$wl"; then
                echo "| $t | $rw $(human "$bs") | $qd | $(fmt0 "${R_IOPS[$t|$wl]}") | $(mbps "${R_IOPS[$t|$wl]}" "$bs") | $(fmt1 "${R_P50[$t|$wl]}") | $(fmt1 "${R_P99[$t|$wl]}") | $(fmt2 "${R_CPU[$t|$wl]}") |"
            else
                echo "| $t | $rw $(human "$bs") | $qd | $st | | | | |"
            fi
        done
    done
    for b in null ram file; do
        if want "uvdpa-$b" && want "qsd-$b"; then
            for wl in $(workloads "uvdpa-$b"); do
                IFS=: read -r rw bs qd <<<"$wl"
                [[ $b == file || $qd == 32 ]] || continue
                echo "| **uvdpa/qsd $b** | $rw $(human "$bs") | $qd | $(ratio R_IOPS "uvdpa-$b" "qsd-$b" "$wl") | | $(ratio R_P50 "uvdpa-$b" "qsd-$b" "$wl") | | $(ratio R_CPU "uvdpa-$b" "qsd-$b" "$wl") |"
            done
        fi
    done
    echo
    echo "Server command lines:"
    echo
    for t in $TARGETS; do
        [[ -n ${SERVER_CMD[$t]:-} ]] && echo "- $t: \`${SERVER_CMD[$t]}\`"
    done
    if want uvdpa-null || want uvdpa-ram; then
        echo "- uvdpa config (backend null or ram): \`[[device]] name=\"bench0\" mgmtdev=\"blk\" size=\"1G\" queues=1 queue_size=256 poll_us=$UVDPA_POLL_US\`"
    fi
    if want uvdpa-file; then
        echo "- uvdpa config (backend file): \`[[device]] name=\"bench0\" mgmtdev=\"blk\" backend=\"file\" path=IMAGE direct=true queues=1 queue_size=256 poll_us=$UVDPA_POLL_US\` (aio: io_uring, the default)"
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
